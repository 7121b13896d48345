//! NPI, DEA and NDC: check digits, registrant types and normalization.
//!
//! Error messages never repeat the identifier itself: they end up in logs and API answers, and an
//! identifier next to a patient's order is PHI.

use std::fmt;

/// Why an identifier was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("an NPI has exactly 10 digits; check the prescriber's NPI on the order")]
    NpiFormat,
    #[error("the NPI's check digit does not match (Luhn over 80840 and the first nine digits); the NPI is mistyped")]
    NpiCheckDigit,
    #[error("a DEA number is two letters (or a letter and 9) followed by seven digits, e.g. AB1234563; check the prescriber's DEA number")]
    DeaFormat,
    #[error("the DEA number's first letter '{0}' is not a registrant type DEA issues")]
    DeaRegistrant(char),
    #[error("the DEA number's check digit does not match; the DEA number is mistyped or invented")]
    DeaCheckDigit,
    #[error("an NDC is 10 digits hyphenated as 4-4-2, 5-3-2 or 5-4-1, or 11 digits (5-4-2); check the product code on the order")]
    NdcFormat,
}

/// Luhn check over the NPI with the `80840` prefix of the US health-industry card issuer
/// (CMS, NPI check digit standard): the 10th digit is the check digit of `80840` + digits 1–9.
pub fn npi_is_valid(npi: &str) -> bool {
    npi_check(npi).is_ok()
}

/// [`npi_is_valid`] with the reason it fails.
pub fn npi_check(npi: &str) -> Result<(), IdError> {
    let npi = npi.trim();
    if npi.len() != 10 || !npi.bytes().all(|b| b.is_ascii_digit()) {
        return Err(IdError::NpiFormat);
    }
    let digits: Vec<u32> = format!("80840{}", &npi[..9])
        .bytes()
        .map(|b| u32::from(b - b'0'))
        .collect();
    // Luhn: double every second digit from the right of the payload (the check digit is not in it).
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            if i % 2 == 0 {
                let x = d * 2;
                if x > 9 {
                    x - 9
                } else {
                    x
                }
            } else {
                d
            }
        })
        .sum();
    let check = (10 - sum % 10) % 10;
    if u32::from(npi.as_bytes()[9] - b'0') == check {
        Ok(())
    } else {
        Err(IdError::NpiCheckDigit)
    }
}

/// Registrant type, from the first letter of a DEA number (DEA Registration Record Layout:
/// "A/B/F/G: Pharmacy / Hospital/Clinic / Practitioner / Teaching Institution; M: Mid-Level
/// Practitioner; P/R: Manufacturer / Distributor / Researcher / Analytical Lab / Importer /
/// Exporter / Reverse Distributor / Narcotic Treatment Program").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeaRegistrant {
    /// A, B, F, G: practitioners, hospitals and clinics, pharmacies, teaching institutions.
    /// (A was issued before October 1985; B, then F and G, after.)
    Practitioner,
    /// M: mid-level practitioners (nurse practitioners, physician assistants, optometrists, ...).
    MidLevel,
    /// P, R: manufacturers, distributors, researchers, analytical labs, importers, exporters,
    /// reverse distributors and narcotic treatment programs. The letter does not tell them apart.
    Distributor,
    /// X: the identifier DEA issued under a DATA 2000 buprenorphine waiver. Not a registration by
    /// itself; since the MAT Act (2023) prescriptions carry the practitioner's standard number.
    DataWaiver,
}

impl DeaRegistrant {
    pub fn from_letter(c: char) -> Option<DeaRegistrant> {
        match c.to_ascii_uppercase() {
            'A' | 'B' | 'F' | 'G' => Some(DeaRegistrant::Practitioner),
            'M' => Some(DeaRegistrant::MidLevel),
            'P' | 'R' => Some(DeaRegistrant::Distributor),
            'X' => Some(DeaRegistrant::DataWaiver),
            _ => None,
        }
    }

    /// Whether a registration of this type may issue prescriptions for controlled substances.
    pub fn may_prescribe(self) -> bool {
        matches!(self, DeaRegistrant::Practitioner | DeaRegistrant::MidLevel)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DeaRegistrant::Practitioner => "practitioner",
            DeaRegistrant::MidLevel => "mid-level practitioner",
            DeaRegistrant::Distributor => "manufacturer or distributor",
            DeaRegistrant::DataWaiver => "DATA-waiver identifier",
        }
    }
}

impl fmt::Display for DeaRegistrant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A DEA registration number that passed the format and check-digit tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeaNumber {
    pub registrant: DeaRegistrant,
    /// The second character: the registrant's last-name initial, or `9` for a business address.
    pub name_initial: char,
    /// The number in canonical form (upper case, no suffix).
    pub number: String,
}

/// Parses and checks a DEA number: a registrant letter, a letter or `9`, seven digits, where the
/// last digit is the last digit of `(d1+d3+d5) + 2*(d2+d4+d6)`. A supervised prescriber's suffix
/// (`-001AB` after the number) is accepted and dropped.
pub fn parse_dea(dea: &str) -> Result<DeaNumber, IdError> {
    let dea = dea.trim();
    let base = dea.split_once('-').map_or(dea, |(b, _)| b);
    let chars: Vec<char> = base.chars().collect();
    if chars.len() != 9 {
        return Err(IdError::DeaFormat);
    }
    let first = chars[0].to_ascii_uppercase();
    let second = chars[1].to_ascii_uppercase();
    if !first.is_ascii_alphabetic()
        || !(second.is_ascii_alphabetic() || second == '9')
        || !chars[2..].iter().all(|c| c.is_ascii_digit())
    {
        return Err(IdError::DeaFormat);
    }
    let registrant = DeaRegistrant::from_letter(first).ok_or(IdError::DeaRegistrant(first))?;
    let d: Vec<u32> = chars[2..].iter().filter_map(|c| c.to_digit(10)).collect();
    let check = ((d[0] + d[2] + d[4]) + 2 * (d[1] + d[3] + d[5])) % 10;
    if check != d[6] {
        return Err(IdError::DeaCheckDigit);
    }
    Ok(DeaNumber {
        registrant,
        name_initial: second,
        number: chars
            .iter()
            .map(|c| c.to_ascii_uppercase())
            .collect::<String>(),
    })
}

/// Normalizes an NDC to the 11-digit 5-4-2 form (HIPAA billing format): hyphenated 4-4-2,
/// 5-3-2 and 5-4-1 get a leading zero in the short segment; 5-4-2 hyphenated and 11 plain
/// digits are taken as they are. A plain 10-digit NDC is refused: without hyphens it is
/// impossible to know which segment to pad.
pub fn normalize_ndc(ndc: &str) -> Result<String, IdError> {
    let ndc = ndc.trim();
    if !ndc.contains('-') {
        return if ndc.len() == 11 && ndc.bytes().all(|b| b.is_ascii_digit()) {
            Ok(ndc.to_string())
        } else {
            Err(IdError::NdcFormat)
        };
    }
    let parts: Vec<&str> = ndc.split('-').collect();
    if parts.len() != 3
        || parts
            .iter()
            .any(|p| p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(IdError::NdcFormat);
    }
    let (labeler, product, package) = (parts[0], parts[1], parts[2]);
    match (labeler.len(), product.len(), package.len()) {
        (4, 4, 2) | (5, 3, 2) | (5, 4, 1) | (5, 4, 2) => {
            Ok(format!("{labeler:0>5}{product:0>4}{package:0>2}"))
        }
        _ => Err(IdError::NdcFormat),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npi_1234567893_is_valid() {
        assert!(npi_is_valid("1234567893"));
    }

    #[test]
    fn npi_1234567890_fails_the_check_digit() {
        assert!(!npi_is_valid("1234567890"));
        assert_eq!(npi_check("1234567890"), Err(IdError::NpiCheckDigit));
    }

    #[test]
    fn npi_from_synthea_export_is_valid() {
        // A prescriber NPI from the Synthea sample (Practitioner.ndjson).
        assert!(npi_is_valid("9999974394"));
    }

    #[test]
    fn npi_with_wrong_length_or_letters_is_a_format_error() {
        assert_eq!(npi_check("123456789"), Err(IdError::NpiFormat));
        assert_eq!(npi_check("12345678931"), Err(IdError::NpiFormat));
        assert_eq!(npi_check("12345A7893"), Err(IdError::NpiFormat));
    }

    #[test]
    fn dea_ap5836727_is_a_valid_practitioner_number() {
        let dea = parse_dea("AP5836727").unwrap();
        assert_eq!(dea.registrant, DeaRegistrant::Practitioner);
        assert_eq!(dea.name_initial, 'P');
        assert!(dea.registrant.may_prescribe());
    }

    #[test]
    fn dea_with_wrong_check_digit_is_refused() {
        assert_eq!(parse_dea("AP5836728"), Err(IdError::DeaCheckDigit));
    }

    #[test]
    fn dea_registrant_comes_from_the_first_letter() {
        // 1+3+5 = 9, 2*(2+4+6) = 24, 33 -> check digit 3.
        for (letter, reg) in [
            ('B', DeaRegistrant::Practitioner),
            ('F', DeaRegistrant::Practitioner),
            ('G', DeaRegistrant::Practitioner),
            ('M', DeaRegistrant::MidLevel),
            ('P', DeaRegistrant::Distributor),
            ('R', DeaRegistrant::Distributor),
            ('X', DeaRegistrant::DataWaiver),
        ] {
            let n = format!("{letter}J1234563");
            assert_eq!(parse_dea(&n).unwrap().registrant, reg, "{n}");
        }
        assert_eq!(parse_dea("ZJ1234563"), Err(IdError::DeaRegistrant('Z')));
    }

    #[test]
    fn distributors_and_data_waiver_ids_may_not_prescribe() {
        assert!(DeaRegistrant::MidLevel.may_prescribe());
        assert!(!DeaRegistrant::Distributor.may_prescribe());
        assert!(!DeaRegistrant::DataWaiver.may_prescribe());
    }

    #[test]
    fn dea_for_business_address_and_supervised_suffix_are_accepted() {
        let dea = parse_dea("F91234563-001AB").unwrap();
        assert_eq!(dea.name_initial, '9');
        assert_eq!(dea.number, "F91234563");
    }

    #[test]
    fn dea_with_bad_shape_is_a_format_error() {
        assert_eq!(parse_dea("A15836727"), Err(IdError::DeaFormat));
        assert_eq!(parse_dea("AP583672"), Err(IdError::DeaFormat));
        assert_eq!(parse_dea("AP58367X7"), Err(IdError::DeaFormat));
        assert_eq!(parse_dea(""), Err(IdError::DeaFormat));
    }

    #[test]
    fn ndc_4_4_2_gets_a_leading_zero_in_the_labeler() {
        assert_eq!(normalize_ndc("0574-4072-05").unwrap(), "00574407205");
    }

    #[test]
    fn ndc_5_3_2_gets_a_leading_zero_in_the_product() {
        assert_eq!(normalize_ndc("51655-089-52").unwrap(), "51655008952");
    }

    #[test]
    fn ndc_5_4_1_gets_a_leading_zero_in_the_package() {
        assert_eq!(normalize_ndc("58118-1397-3").unwrap(), "58118139703");
    }

    #[test]
    fn ndc_already_11_digits_is_kept() {
        assert_eq!(normalize_ndc("00093005801").unwrap(), "00093005801");
        assert_eq!(normalize_ndc("00093-0058-01").unwrap(), "00093005801");
    }

    #[test]
    fn ambiguous_or_malformed_ndc_is_refused() {
        for bad in [
            "0574407205",
            "574-4072-05",
            "0574-4072",
            "0574-40a2-05",
            "",
            "1-2-3",
        ] {
            assert_eq!(normalize_ndc(bad), Err(IdError::NdcFormat), "{bad}");
        }
    }

    #[test]
    fn id_errors_never_repeat_the_identifier() {
        let msg = parse_dea("AP5836728").unwrap_err().to_string();
        assert!(!msg.contains("5836728"));
        let msg = normalize_ndc("0574-4072-0X").unwrap_err().to_string();
        assert!(!msg.contains("4072"));
    }
}
