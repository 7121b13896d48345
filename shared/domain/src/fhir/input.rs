//! FHIR R4 in: MedicationRequest, Patient, Practitioner and AllergyIntolerance to the model.

use super::json::{
    as_obj, at, err, objs, opt_bool, opt_num, opt_obj, opt_str, opt_u32, parse_date, parse_instant,
    percent_decode, strs, Obj,
};
use super::{reference_id, reference_type, FhirError, Index};
use crate::model::{
    Allergy, Coding, Dosage, MedicationCode, MedicationOrder, PatientRecord, PrescriberRecord,
    PrescriberRef, DEA_SYSTEM, NDC, NPI_SYSTEM, RXNORM,
};
use serde_json::Value;

const RXNORM_OID: &str = "urn:oid:2.16.840.1.113883.6.88";
const NDC_OID: &str = "urn:oid:2.16.840.1.113883.6.69";
const SSN_SYSTEM: &str = "http://hl7.org/fhir/sid/us-ssn";

/// The object of a resource of the expected type.
pub(crate) fn resource<'a>(v: &'a Value, path: &str, expected: &str) -> Result<&'a Obj, FhirError> {
    let o = as_obj(v, path)?;
    match opt_str(o, "resourceType", path)? {
        Some(t) if t == expected => Ok(o),
        Some(_) => Err(err(
            at(path, "resourceType"),
            format!("must be {expected} here"),
        )),
        None => Err(err(
            at(path, "resourceType"),
            format!("is required: set \"resourceType\": \"{expected}\""),
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// MedicationRequest

pub(crate) fn medication_request(
    v: &Value,
    path: &str,
    bundle: Option<&Index<'_>>,
) -> Result<MedicationOrder, FhirError> {
    let o = resource(v, path, "MedicationRequest")?;
    let status = opt_str(o, "status", path)?.ok_or_else(|| {
        err(
            at(path, "status"),
            "is required: give the order's status (e.g. active)",
        )
    })?;
    let intent = opt_str(o, "intent", path)?.ok_or_else(|| {
        err(
            at(path, "intent"),
            "is required: give the order's intent (e.g. order)",
        )
    })?;
    let patient_ref = subject(o, path, bundle)?;
    let medication = medication(o, path, bundle)?;
    let requester = requester(o, path, bundle)?;
    let authored_on = opt_str(o, "authoredOn", path)?
        .map(|s| parse_instant(s, &at(path, "authoredOn"), false))
        .transpose()?;

    let mut order = MedicationOrder {
        source_id: opt_str(o, "id", path)?.map(str::to_owned),
        status: status.to_owned(),
        intent: intent.to_owned(),
        patient_ref,
        requester,
        medication,
        authored_on,
        quantity: None,
        quantity_unit: None,
        days_supply: None,
        refills: None,
        valid_until: None,
        dosage: Vec::new(),
        note: None,
    };

    let dr_path = at(path, "dispenseRequest");
    if let Some(dr) = opt_obj(o, "dispenseRequest", path)? {
        if let Some(q) = opt_obj(dr, "quantity", &dr_path)? {
            let qp = at(&dr_path, "quantity");
            order.quantity = opt_num(q, "value", &qp)?;
            if order.quantity.is_some_and(|x| x < 0.0) {
                return Err(err(at(&qp, "value"), "must not be negative"));
            }
            order.quantity_unit = quantity_unit(q, &qp)?;
        }
        if let Some(d) = opt_obj(dr, "expectedSupplyDuration", &dr_path)? {
            order.days_supply = duration_days(d, &at(&dr_path, "expectedSupplyDuration"))?;
        }
        order.refills = opt_u32(dr, "numberOfRepeatsAllowed", &dr_path)?;
        if let Some(p) = opt_obj(dr, "validityPeriod", &dr_path)? {
            let pp = at(&dr_path, "validityPeriod");
            order.valid_until = opt_str(p, "end", &pp)?
                .map(|s| parse_instant(s, &at(&pp, "end"), true))
                .transpose()?;
        }
    }

    for (i, d) in objs(o, "dosageInstruction", path)? {
        order
            .dosage
            .push(dosage(d, &format!("{path}.dosageInstruction[{i}]"))?);
    }

    let mut notes = Vec::new();
    for (i, n) in objs(o, "note", path)? {
        if let Some(t) = opt_str(n, "text", &format!("{path}.note[{i}]"))? {
            notes.push(t);
        }
    }
    if !notes.is_empty() {
        order.note = Some(notes.join("\n"));
    }
    Ok(order)
}

/// The contained resource `#id` of the given type.
fn contained<'a>(
    o: &'a Obj,
    path: &str,
    local: &str,
    types: &[&str],
) -> Result<Option<(usize, &'a Value)>, FhirError> {
    let id = local.trim_start_matches('#');
    for (i, c) in objs(o, "contained", path)? {
        let cp = format!("{path}.contained[{i}]");
        if opt_str(c, "id", &cp)? == Some(id) {
            let t = opt_str(c, "resourceType", &cp)?.unwrap_or_default();
            if types.contains(&t) {
                return Ok(o.get("contained").and_then(|a| a.get(i)).map(|v| (i, v)));
            }
            return Err(err(
                at(&cp, "resourceType"),
                format!("must be {} for the reference to it", types.join(" or ")),
            ));
        }
    }
    Ok(None)
}

fn subject(o: &Obj, path: &str, bundle: Option<&Index<'_>>) -> Result<String, FhirError> {
    let sp = at(path, "subject");
    let s = opt_obj(o, "subject", path)?.ok_or_else(|| {
        err(
            &sp,
            "is required: reference the patient (\"subject\": {\"reference\": \"Patient/<id>\"})",
        )
    })?;
    patient_reference(s, &sp, bundle)
}

/// The patient id a Reference(Patient) points at, resolved through the Bundle when there is one.
fn patient_reference(r: &Obj, path: &str, bundle: Option<&Index<'_>>) -> Result<String, FhirError> {
    if let Some(reference) = opt_str(r, "reference", path)? {
        let rp = at(path, "reference");
        if let Some(ix) = bundle {
            if let Some(id) = ix.patient_id(reference) {
                return Ok(id);
            }
        }
        if let Some((ty, query)) = reference.split_once('?') {
            if ty != "Patient" {
                return Err(err(rp, "must reference a Patient"));
            }
            return conditional_identifier(query)
                .map(|(_, value)| value)
                .ok_or_else(|| {
                    err(
                        rp,
                        "is a conditional reference without an identifier: use Patient/<id> or Patient?identifier=<system>|<value>",
                    )
                });
        }
        if reference_type(reference).is_some_and(|t| t != "Patient") {
            return Err(err(rp, "must reference a Patient (Patient/<id>)"));
        }
        return reference_id(reference).map(str::to_owned).ok_or_else(|| {
            err(
                rp,
                "is not a FHIR reference: use Patient/<id> or urn:uuid:<id>",
            )
        });
    }
    if let Some(ident) = opt_obj(r, "identifier", path)? {
        if let Some(v) = opt_str(ident, "value", &at(path, "identifier"))? {
            return Ok(v.to_owned());
        }
    }
    Err(err(
        path,
        "names no patient: give a reference (Patient/<id>) or an identifier",
    ))
}

/// `identifier=<system>|<value>` (or `identifier=<value>`) from a conditional reference's query.
fn conditional_identifier(query: &str) -> Option<(Option<String>, String)> {
    let query = percent_decode(query);
    query.split('&').find_map(|param| {
        let v = param.strip_prefix("identifier=")?;
        let (system, value) = match v.split_once('|') {
            Some((s, val)) => ((!s.is_empty()).then(|| s.to_owned()), val),
            None => (None, v),
        };
        (!value.is_empty()).then(|| (system, value.to_owned()))
    })
}

fn requester(o: &Obj, path: &str, bundle: Option<&Index<'_>>) -> Result<PrescriberRef, FhirError> {
    let rp = at(path, "requester");
    let Some(r) = opt_obj(o, "requester", path)? else {
        return Ok(PrescriberRef::Missing);
    };
    if let Some(reference) = opt_str(r, "reference", &rp)? {
        let refp = at(&rp, "reference");
        if reference.starts_with('#') {
            let (i, c) = contained(o, path, reference, &["Practitioner"])?
                .ok_or_else(|| err(&refp, "points at a contained Practitioner that is not there: add it to \"contained\" with that id"))?;
            let p = practitioner(c, &format!("{path}.contained[{i}]"))?;
            return Ok(PrescriberRef::Inline(Box::new(p)));
        }
        if let Some((ty, query)) = reference.split_once('?') {
            let npi = match conditional_identifier(query) {
                Some((Some(system), value)) if system == NPI_SYSTEM => Some(value),
                Some((None, value)) if is_npi_shaped(&value) => Some(value),
                _ => None,
            };
            let Some(npi) = npi.filter(|_| ty == "Practitioner") else {
                return Err(err(
                    refp,
                    "is a conditional reference rxflow cannot resolve: use Practitioner?identifier=http://hl7.org/fhir/sid/us-npi|<npi>",
                ));
            };
            if let Some(ix) = bundle {
                if let Some(p) = ix.practitioner_by_npi(&npi)? {
                    return Ok(PrescriberRef::Inline(Box::new(p)));
                }
            }
            return Ok(PrescriberRef::Npi(npi));
        }
        if let Some(ix) = bundle {
            if let Some(p) = ix.practitioner(reference)? {
                return Ok(PrescriberRef::Inline(Box::new(p)));
            }
        }
        return reference_id(reference)
            .map(|id| PrescriberRef::Reference(id.to_owned()))
            .ok_or_else(|| err(refp, "is not a FHIR reference: use Practitioner/<id>"));
    }
    if let Some(ident) = opt_obj(r, "identifier", &rp)? {
        let ip = at(&rp, "identifier");
        let system = opt_str(ident, "system", &ip)?;
        let value = opt_str(ident, "value", &ip)?;
        return match (system, value) {
            (Some(NPI_SYSTEM), Some(v)) => Ok(PrescriberRef::Npi(v.to_owned())),
            _ => Err(err(
                ip,
                "must be an NPI identifier (system http://hl7.org/fhir/sid/us-npi)",
            )),
        };
    }
    Ok(PrescriberRef::Missing)
}

fn is_npi_shaped(s: &str) -> bool {
    s.len() == 10 && s.bytes().all(|b| b.is_ascii_digit())
}

fn medication(
    o: &Obj,
    path: &str,
    bundle: Option<&Index<'_>>,
) -> Result<MedicationCode, FhirError> {
    if let Some(cc) = opt_obj(o, "medicationCodeableConcept", path)? {
        return medication_code(cc, &at(path, "medicationCodeableConcept"));
    }
    let mp = at(path, "medicationReference");
    if let Some(r) = opt_obj(o, "medicationReference", path)? {
        let display = opt_str(r, "display", &mp)?;
        let Some(reference) = opt_str(r, "reference", &mp)? else {
            return match display {
                Some(d) => Ok(MedicationCode {
                    display: Some(d.to_owned()),
                    ..MedicationCode::default()
                }),
                None => Err(err(
                    mp,
                    "names no medication: give a reference or a display",
                )),
            };
        };
        let refp = at(&mp, "reference");
        let (med, med_path) = if reference.starts_with('#') {
            let (i, c) = contained(o, path, reference, &["Medication"])?.ok_or_else(|| {
                err(
                    &refp,
                    "points at a contained Medication that is not there: add it to \"contained\" with that id",
                )
            })?;
            (c, format!("{path}.contained[{i}]"))
        } else if let Some((c, p)) = bundle.and_then(|ix| ix.resolve(reference)) {
            (c, p)
        } else {
            return Err(err(
                refp,
                "points at a Medication that is not in the request: contain it (\"#<id>\") or send it in the same Bundle",
            ));
        };
        let mo = resource(med, &med_path, "Medication")?;
        let code = opt_obj(mo, "code", &med_path)?.ok_or_else(|| {
            err(
                at(&med_path, "code"),
                "is required: give the product's RxNorm or NDC code",
            )
        })?;
        let mut m = medication_code(code, &at(&med_path, "code"))?;
        if m.display.is_none() {
            m.display = display.map(str::to_owned);
        }
        return Ok(m);
    }
    Err(err(
        at(path, "medication[x]"),
        "is required: give medicationCodeableConcept (with an RxNorm coding) or medicationReference",
    ))
}

fn medication_code(cc: &Obj, path: &str) -> Result<MedicationCode, FhirError> {
    let mut m = MedicationCode::default();
    let mut first_display = None;
    for (i, c) in objs(cc, "coding", path)? {
        let cp = format!("{path}.coding[{i}]");
        let system = opt_str(c, "system", &cp)?;
        let code = opt_str(c, "code", &cp)?;
        if first_display.is_none() {
            first_display = opt_str(c, "display", &cp)?;
        }
        match (system, code) {
            (Some(RXNORM | RXNORM_OID), Some(code)) if m.rxnorm.is_none() => {
                m.rxnorm = Some(code.trim().to_owned());
            }
            (Some(NDC | NDC_OID), Some(code)) if m.ndc.is_none() => {
                // Normalized to 11 digits; a code that is no NDC is kept as sent, and validation
                // rejects the order with `ndc-invalid` (a prescription to send back, not bad input).
                m.ndc = Some(
                    crate::ids::normalize_ndc(code).unwrap_or_else(|_| code.trim().to_owned()),
                );
            }
            _ => {}
        }
    }
    m.display = opt_str(cc, "text", path)?
        .or(first_display)
        .map(str::to_owned);
    if m.rxnorm.is_none() && m.ndc.is_none() && m.display.is_none() {
        return Err(err(
            path,
            "names no product: give an RxNorm coding (system http://www.nlm.nih.gov/research/umls/rxnorm)",
        ));
    }
    Ok(m)
}

fn quantity_unit(q: &Obj, path: &str) -> Result<Option<String>, FhirError> {
    Ok(opt_str(q, "unit", path)?
        .or(opt_str(q, "code", path)?)
        .map(str::to_owned))
}

/// A Duration as whole days (rounded up: a supply of 36 hours lasts into a second day).
fn duration_days(d: &Obj, path: &str) -> Result<Option<u32>, FhirError> {
    let Some(value) = opt_num(d, "value", path)? else {
        return Ok(None);
    };
    if value < 0.0 {
        return Err(err(at(path, "value"), "must not be negative"));
    }
    let unit = opt_str(d, "code", path)?.or(opt_str(d, "unit", path)?);
    let factor = match unit {
        None => 1.0,
        Some(u) => unit_days(u).ok_or_else(|| {
            err(
                at(path, "code"),
                "is not a time unit rxflow knows: use d, wk, mo or a (UCUM)",
            )
        })?,
    };
    let days = (value * factor - 1e-9).ceil().max(0.0);
    if days > f64::from(u32::MAX) {
        return Err(err(at(path, "value"), "is too large"));
    }
    Ok(Some(days as u32))
}

/// Days in one UCUM time unit (or its common spelled-out names).
fn unit_days(u: &str) -> Option<f64> {
    Some(match u.trim().to_ascii_lowercase().as_str() {
        "s" | "sec" | "second" | "seconds" => 1.0 / 86_400.0,
        "min" | "minute" | "minutes" => 1.0 / 1_440.0,
        "h" | "hr" | "hour" | "hours" => 1.0 / 24.0,
        "d" | "day" | "days" => 1.0,
        "wk" | "week" | "weeks" => 7.0,
        "mo" | "month" | "months" => 30.0,
        "a" | "yr" | "year" | "years" => 365.0,
        _ => return None,
    })
}

fn dosage(d: &Obj, path: &str) -> Result<Dosage, FhirError> {
    let mut out = Dosage {
        text: opt_str(d, "text", path)?.map(str::to_owned),
        as_needed: opt_bool(d, "asNeededBoolean", path)?.unwrap_or(false)
            || opt_obj(d, "asNeededCodeableConcept", path)?.is_some(),
        ..Dosage::default()
    };
    if let Some(t) = opt_obj(d, "timing", path)? {
        let tp = at(path, "timing");
        if let Some(r) = opt_obj(t, "repeat", &tp)? {
            let rp = at(&tp, "repeat");
            let frequency = opt_num(r, "frequency", &rp)?;
            if let Some(period) = opt_num(r, "period", &rp)? {
                if period <= 0.0 {
                    return Err(err(at(&rp, "period"), "must be greater than zero"));
                }
                let unit = opt_str(r, "periodUnit", &rp)?.unwrap_or("d");
                let factor = unit_days(unit).ok_or_else(|| {
                    err(
                        at(&rp, "periodUnit"),
                        "must be one of s, min, h, d, wk, mo, a",
                    )
                })?;
                out.per_day = Some(frequency.unwrap_or(1.0) / (period * factor));
            }
        }
        if out.per_day.is_none() {
            if let Some(code) = opt_obj(t, "code", &tp)? {
                let cp = at(&tp, "code");
                for (i, c) in objs(code, "coding", &cp)? {
                    if let Some(k) = opt_str(c, "code", &format!("{cp}.coding[{i}]"))? {
                        out.per_day = out.per_day.or_else(|| timing_abbreviation_per_day(k));
                    }
                }
            }
        }
    }
    if let Some((i, dr)) = objs(d, "doseAndRate", path)?.next() {
        let dp = format!("{path}.doseAndRate[{i}]");
        let q = match opt_obj(dr, "doseQuantity", &dp)? {
            Some(q) => Some((q, at(&dp, "doseQuantity"))),
            None => match opt_obj(dr, "doseRange", &dp)? {
                // A range is reviewed at its upper bound: the most the patient may take.
                Some(range) => {
                    let rp = at(&dp, "doseRange");
                    opt_obj(range, "high", &rp)?
                        .map(|h| (h, at(&rp, "high")))
                        .or(opt_obj(range, "low", &rp)?.map(|l| (l, at(&rp, "low"))))
                }
                None => None,
            },
        };
        if let Some((q, qp)) = q {
            out.dose_quantity = opt_num(q, "value", &qp)?;
            if out.dose_quantity.is_some_and(|x| x < 0.0) {
                return Err(err(at(&qp, "value"), "must not be negative"));
            }
            out.dose_unit = quantity_unit(q, &qp)?;
        }
    }
    Ok(out)
}

/// HL7 v3 GTSAbbreviation timing codes → administrations per day.
fn timing_abbreviation_per_day(code: &str) -> Option<f64> {
    Some(match code {
        "QD" | "AM" | "PM" | "QHS" => 1.0,
        "BID" | "Q12H" => 2.0,
        "TID" | "Q8H" => 3.0,
        "QID" | "Q6H" => 4.0,
        "Q4H" => 6.0,
        "Q3H" => 8.0,
        "Q2H" => 12.0,
        "Q1H" | "QH" => 24.0,
        "QOD" => 0.5,
        "WK" => 1.0 / 7.0,
        _ => return None,
    })
}

// ---------------------------------------------------------------------------------------------
// Patient, Practitioner, AllergyIntolerance

pub(crate) fn patient(
    v: &Value,
    path: &str,
    fallback_id: Option<&str>,
) -> Result<PatientRecord, FhirError> {
    let o = resource(v, path, "Patient")?;
    let source_id = opt_str(o, "id", path)?
        .or(fallback_id)
        .ok_or_else(|| err(at(path, "id"), "is required: give the patient's id"))?
        .to_owned();
    let mut identifiers = Vec::new();
    for (i, ident) in objs(o, "identifier", path)? {
        if let Some(c) = identifier(ident, &format!("{path}.identifier[{i}]"))? {
            identifiers.push(c);
        }
    }
    let birth_date = opt_str(o, "birthDate", path)?
        .map(|s| parse_date(s, &at(path, "birthDate")))
        .transpose()?;
    let mut phone = None;
    for (i, t) in objs(o, "telecom", path)? {
        let tp = format!("{path}.telecom[{i}]");
        if phone.is_none() && matches!(opt_str(t, "system", &tp)?, Some("phone") | Some("sms")) {
            phone = opt_str(t, "value", &tp)?.map(str::to_owned);
        }
    }
    Ok(PatientRecord {
        source_id,
        identifiers,
        name: human_name(o, path)?,
        birth_date,
        gender: opt_str(o, "gender", path)?.map(str::to_owned),
        address: address(o, path)?,
        phone,
        allergies: Vec::new(),
    })
}

/// An Identifier as a Coding: system, value as the code, and the identifier type code
/// (v2-0203: MR, SS, DL, PPN, NPI, DEA, ...) as the display so callers can find the MRN by type.
fn identifier(ident: &Obj, path: &str) -> Result<Option<Coding>, FhirError> {
    let Some(value) = opt_str(ident, "value", path)? else {
        return Ok(None);
    };
    let type_code = identifier_type(ident, path)?;
    let system = opt_str(ident, "system", path)?;
    let system = match (system, type_code) {
        (Some(s), _) => s.to_owned(),
        (None, Some("SS")) => SSN_SYSTEM.to_owned(),
        (None, _) => String::new(),
    };
    Ok(Some(Coding {
        system,
        code: value.to_owned(),
        display: type_code.map(str::to_owned),
    }))
}

fn identifier_type<'a>(ident: &'a Obj, path: &str) -> Result<Option<&'a str>, FhirError> {
    let Some(t) = opt_obj(ident, "type", path)? else {
        return Ok(None);
    };
    let tp = at(path, "type");
    for (i, c) in objs(t, "coding", &tp)? {
        if let Some(code) = opt_str(c, "code", &format!("{tp}.coding[{i}]"))? {
            return Ok(Some(code));
        }
    }
    Ok(None)
}

/// "given family" of the official name (else usual, else the first).
fn human_name(o: &Obj, path: &str) -> Result<Option<String>, FhirError> {
    let mut best: Option<(u8, usize, &Obj)> = None;
    for (i, n) in objs(o, "name", path)? {
        let rank = match opt_str(n, "use", &format!("{path}.name[{i}]"))? {
            Some("official") => 0,
            Some("usual") => 1,
            None => 2,
            Some(_) => 3,
        };
        if best.is_none_or(|(r, _, _)| rank < r) {
            best = Some((rank, i, n));
        }
    }
    let Some((_, i, n)) = best else {
        return Ok(None);
    };
    let np = format!("{path}.name[{i}]");
    let mut parts: Vec<&str> = strs(n, "given", &np)?;
    if let Some(f) = opt_str(n, "family", &np)? {
        parts.push(f);
    }
    if parts.is_empty() {
        return Ok(opt_str(n, "text", &np)?.map(str::to_owned));
    }
    Ok(Some(parts.join(" ")))
}

/// "line, line, city, state postalCode" of the home address (else the first).
fn address(o: &Obj, path: &str) -> Result<Option<String>, FhirError> {
    let mut chosen: Option<(usize, &Obj)> = None;
    for (i, a) in objs(o, "address", path)? {
        let home = opt_str(a, "use", &format!("{path}.address[{i}]"))? == Some("home");
        if chosen.is_none() || home {
            chosen = Some((i, a));
            if home {
                break;
            }
        }
    }
    let Some((i, a)) = chosen else {
        return Ok(None);
    };
    let ap = format!("{path}.address[{i}]");
    let mut parts: Vec<String> = strs(a, "line", &ap)?
        .into_iter()
        .map(str::to_owned)
        .collect();
    if let Some(c) = opt_str(a, "city", &ap)? {
        parts.push(c.to_owned());
    }
    let state_zip: Vec<&str> = [opt_str(a, "state", &ap)?, opt_str(a, "postalCode", &ap)?]
        .into_iter()
        .flatten()
        .collect();
    if !state_zip.is_empty() {
        parts.push(state_zip.join(" "));
    }
    if parts.is_empty() {
        return Ok(opt_str(a, "text", &ap)?.map(str::to_owned));
    }
    Ok(Some(parts.join(", ")))
}

pub(crate) fn practitioner(v: &Value, path: &str) -> Result<PrescriberRecord, FhirError> {
    let o = resource(v, path, "Practitioner")?;
    let mut p = PrescriberRecord {
        source_id: opt_str(o, "id", path)?.map(str::to_owned),
        name: human_name(o, path)?,
        ..PrescriberRecord::default()
    };
    for (i, ident) in objs(o, "identifier", path)? {
        let ip = format!("{path}.identifier[{i}]");
        let Some(value) = opt_str(ident, "value", &ip)? else {
            continue;
        };
        let system = opt_str(ident, "system", &ip)?.unwrap_or_default();
        let type_code = identifier_type(ident, &ip)?;
        let is_dea = system == DEA_SYSTEM
            || system.to_ascii_lowercase().contains("dea")
            || type_code == Some("DEA");
        if system == NPI_SYSTEM || type_code == Some("NPI") {
            p.npi.get_or_insert_with(|| value.trim().to_owned());
        } else if is_dea {
            p.dea
                .get_or_insert_with(|| value.trim().to_ascii_uppercase());
        }
    }
    Ok(p)
}

pub(crate) fn allergy(
    v: &Value,
    path: &str,
    bundle: Option<&Index<'_>>,
) -> Result<(String, Allergy), FhirError> {
    let o = resource(v, path, "AllergyIntolerance")?;
    let pp = at(path, "patient");
    let p = opt_obj(o, "patient", path)?.ok_or_else(|| {
        err(
            &pp,
            "is required: reference the patient (\"patient\": {\"reference\": \"Patient/<id>\"})",
        )
    })?;
    let patient_ref = patient_reference(p, &pp, bundle)?;

    let mut codes = Vec::new();
    let mut substance = None;
    let cp = at(path, "code");
    if let Some(code) = opt_obj(o, "code", path)? {
        substance = opt_str(code, "text", &cp)?;
        for (i, c) in objs(code, "coding", &cp)? {
            let ccp = format!("{cp}.coding[{i}]");
            let display = opt_str(c, "display", &ccp)?;
            substance = substance.or(display);
            if let (Some(system), Some(code)) =
                (opt_str(c, "system", &ccp)?, opt_str(c, "code", &ccp)?)
            {
                codes.push(Coding {
                    system: system.to_owned(),
                    code: code.to_owned(),
                    display: display.map(str::to_owned),
                });
            }
        }
    }
    let first_code = codes.first().map(|c| c.code.clone());
    let substance = substance.map(str::to_owned).or(first_code).ok_or_else(|| {
        err(
            &cp,
            "is required: name the substance (an RxNorm ingredient coding or text)",
        )
    })?;
    let clinical_status = match opt_obj(o, "clinicalStatus", path)? {
        None => None,
        Some(cs) => {
            let csp = at(path, "clinicalStatus");
            let mut status = None;
            for (i, c) in objs(cs, "coding", &csp)? {
                status = status.or(opt_str(c, "code", &format!("{csp}.coding[{i}]"))?);
            }
            status.or(opt_str(cs, "text", &csp)?).map(str::to_owned)
        }
    };
    Ok((
        patient_ref,
        Allergy {
            source_id: opt_str(o, "id", path)?.map(str::to_owned),
            codes,
            substance,
            criticality: opt_str(o, "criticality", path)?.map(str::to_owned),
            clinical_status,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn supply_durations_convert_to_days() {
        let d = |v: Value| duration_days(v.as_object().unwrap(), "d").unwrap();
        assert_eq!(d(serde_json::json!({"value": 2, "code": "wk"})), Some(14));
        assert_eq!(
            d(serde_json::json!({"value": 1, "unit": "month"})),
            Some(30)
        );
        assert_eq!(d(serde_json::json!({"value": 36, "code": "h"})), Some(2));
        assert_eq!(d(serde_json::json!({"value": 5})), Some(5));
        assert!(duration_days(
            serde_json::json!({"value": 5, "code": "furlong"})
                .as_object()
                .unwrap(),
            "d"
        )
        .is_err());
    }
}
