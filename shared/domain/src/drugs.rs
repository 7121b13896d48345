//! The drug reference table: RxNorm product → ingredients, classes, DEA schedule, strength and
//! MME factor, plus the drug–drug interaction table.
//!
//! Both are the project's own data files (`data/drugs.tsv`, `data/interactions.tsv`; their
//! header comments say where each fact comes from), embedded in the binary and parsed once.

use crate::Severity;
use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

const DRUGS_TSV: &str = include_str!("../data/drugs.tsv");
const INTERACTIONS_TSV: &str = include_str!("../data/interactions.tsv");

/// DEA schedule of a controlled substance (21 CFR 1308.12–1308.15). Schedule I substances are
/// not prescribable and never appear in the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Schedule {
    II,
    III,
    IV,
    V,
}

impl Schedule {
    pub fn as_str(self) -> &'static str {
        match self {
            Schedule::II => "CII",
            Schedule::III => "CIII",
            Schedule::IV => "CIV",
            Schedule::V => "CV",
        }
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Schedule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "CII" => Ok(Schedule::II),
            "CIII" => Ok(Schedule::III),
            "CIV" => Ok(Schedule::IV),
            "CV" => Ok(Schedule::V),
            other => Err(format!(
                "unknown DEA schedule '{other}' (use CII, CIII, CIV or CV)"
            )),
        }
    }
}

/// One product of the reference table.
#[derive(Debug, Clone, PartialEq)]
pub struct Product {
    pub rxnorm: String,
    pub name: String,
    /// Lower-case ingredient names, e.g. `["acetaminophen", "oxycodone"]`.
    pub ingredients: Vec<String>,
    /// e.g. "opioid", "benzodiazepine", "nsaid", "anticoagulant", "stimulant", "sedative-hypnotic".
    pub classes: Vec<String>,
    pub schedule: Option<Schedule>,
    /// Of the MME-relevant (opioid) ingredient per unit for opioids, in mg (patches: mcg/hr);
    /// for other products the labelled strength of the first ingredient.
    pub strength_mg: Option<f64>,
    /// tablet, capsule, mL, patch, ...
    pub unit: String,
    /// CDC 2022 MME conversion factor, opioids only.
    pub mme_factor: Option<f64>,
}

impl Product {
    pub fn is_controlled(&self) -> bool {
        self.schedule.is_some()
    }

    pub fn has_class(&self, c: &str) -> bool {
        self.classes.iter().any(|x| x.eq_ignore_ascii_case(c))
    }

    pub fn has_ingredient(&self, i: &str) -> bool {
        self.ingredients.iter().any(|x| x.eq_ignore_ascii_case(i))
    }

    /// Transdermal systems whose strength is a rate (mcg/hr).
    pub fn is_patch(&self) -> bool {
        self.unit == "patch"
    }
}

/// A drug–drug interaction between two ingredients.
#[derive(Debug, Clone, PartialEq)]
pub struct Interaction {
    pub a: String,
    pub b: String,
    pub severity: Severity,
    pub summary: String,
    /// Where the rule comes from: `onc-high-priority` or `clinical`.
    pub source: String,
}

/// A fault in an embedded data file (only reachable when a data file is edited badly; the
/// tests load the embedded table, so a bad edit fails the build's tests).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file} line {line}: {problem}")]
pub struct TableError {
    pub file: &'static str,
    pub line: usize,
    pub problem: String,
}

/// The drug reference table and the interaction table.
#[derive(Debug, Clone)]
pub struct DrugTable {
    products: Vec<Product>,
    by_rxnorm: HashMap<String, usize>,
    interactions: HashMap<(String, String), Interaction>,
}

static EMBEDDED: OnceLock<DrugTable> = OnceLock::new();

impl DrugTable {
    /// The table built into the binary, parsed on first use.
    ///
    /// # Panics
    /// Only if the embedded data files are malformed, which `embedded_tables_parse` and the other
    /// unit tests rule out before a build ships.
    pub fn embedded() -> &'static DrugTable {
        EMBEDDED.get_or_init(|| match DrugTable::parse(DRUGS_TSV, INTERACTIONS_TSV) {
            Ok(t) => t,
            Err(e) => panic!("embedded drug table is malformed: {e}"),
        })
    }

    /// Parses a table from the two TSV texts (format in the files' header comments).
    pub fn parse(drugs_tsv: &str, interactions_tsv: &str) -> Result<DrugTable, TableError> {
        let products = parse_products(drugs_tsv)?;
        let mut by_rxnorm = HashMap::new();
        for (i, p) in products.iter().enumerate() {
            if by_rxnorm.insert(p.rxnorm.clone(), i).is_some() {
                return Err(TableError {
                    file: "drugs.tsv",
                    line: 0,
                    problem: format!("RxNorm {} appears twice", p.rxnorm),
                });
            }
        }
        let interactions = parse_interactions(interactions_tsv)?;
        Ok(DrugTable {
            products,
            by_rxnorm,
            interactions,
        })
    }

    pub fn product(&self, rxnorm: &str) -> Option<&Product> {
        self.by_rxnorm
            .get(rxnorm.trim())
            .map(|&i| &self.products[i])
    }

    pub fn products(&self) -> impl Iterator<Item = &Product> {
        self.products.iter()
    }

    /// The interaction between two ingredients, in either order.
    pub fn interaction(&self, ingredient_a: &str, ingredient_b: &str) -> Option<&Interaction> {
        self.interactions.get(&pair_key(ingredient_a, ingredient_b))
    }

    /// Every interaction pair in the table (each unordered pair once).
    pub fn interactions(&self) -> impl Iterator<Item = &Interaction> {
        self.interactions.values()
    }
}

fn pair_key(a: &str, b: &str) -> (String, String) {
    let (a, b) = (a.trim().to_lowercase(), b.trim().to_lowercase());
    if a <= b {
        (a, b)
    } else {
        (b, a)
    }
}

fn data_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim_end_matches('\r')))
        .filter(|(_, l)| !l.trim().is_empty() && !l.starts_with('#'))
}

fn opt(field: &str) -> Option<&str> {
    let f = field.trim();
    (!f.is_empty() && f != "-").then_some(f)
}

fn list(field: &str) -> Vec<String> {
    opt(field)
        .map(|f| {
            f.split(',')
                .map(|s| s.trim().to_lowercase())
                .filter(|s| !s.is_empty())
                .collect()
        })
        .unwrap_or_default()
}

fn parse_products(text: &str) -> Result<Vec<Product>, TableError> {
    let err = |line, problem: String| TableError {
        file: "drugs.tsv",
        line,
        problem,
    };
    let number = |line, f: &str| -> Result<Option<f64>, TableError> {
        opt(f)
            .map(|v| {
                v.parse::<f64>()
                    .map_err(|_| err(line, format!("'{v}' is not a number")))
            })
            .transpose()
    };
    let mut out = Vec::new();
    for (line, l) in data_lines(text) {
        let f: Vec<&str> = l.split('\t').collect();
        if f.len() < 8 {
            return Err(err(line, format!("expected 8 columns, found {}", f.len())));
        }
        let ingredients = list(f[2]);
        if ingredients.is_empty() {
            return Err(err(line, "a product needs at least one ingredient".into()));
        }
        out.push(Product {
            rxnorm: f[0].trim().to_string(),
            name: f[1].trim().to_string(),
            ingredients,
            classes: list(f[3]),
            schedule: opt(f[4])
                .map(|s| s.parse::<Schedule>().map_err(|e| err(line, e)))
                .transpose()?,
            strength_mg: number(line, f[5])?,
            unit: f[6].trim().to_string(),
            mme_factor: number(line, f[7])?,
        });
    }
    Ok(out)
}

fn parse_severity(s: &str) -> Option<Severity> {
    match s {
        "low" => Some(Severity::Low),
        "moderate" => Some(Severity::Moderate),
        "high" => Some(Severity::High),
        _ => None,
    }
}

fn parse_interactions(text: &str) -> Result<HashMap<(String, String), Interaction>, TableError> {
    let err = |line, problem: String| TableError {
        file: "interactions.tsv",
        line,
        problem,
    };
    let mut sets: HashMap<String, Vec<String>> = HashMap::new();
    let mut out: HashMap<(String, String), Interaction> = HashMap::new();
    for (line, l) in data_lines(text) {
        let f: Vec<&str> = l.split('\t').collect();
        match f.first().copied() {
            Some("set") if f.len() >= 3 => {
                sets.insert(f[1].trim().to_lowercase(), list(f[2]));
            }
            Some("rule") if f.len() >= 6 => {
                let side = |name: &str| {
                    let name = name.trim().to_lowercase();
                    sets.get(&name).cloned().unwrap_or_else(|| vec![name])
                };
                let severity = parse_severity(f[3].trim())
                    .ok_or_else(|| err(line, format!("unknown severity '{}'", f[3])))?;
                let (left, right) = (side(f[1]), side(f[2]));
                for a in &left {
                    for b in &right {
                        if a == b {
                            continue;
                        }
                        let key = pair_key(a, b);
                        let keep_old = out.get(&key).is_some_and(|old| old.severity >= severity);
                        if !keep_old {
                            out.insert(
                                key.clone(),
                                Interaction {
                                    a: key.0,
                                    b: key.1,
                                    severity,
                                    summary: f[5].trim().to_string(),
                                    source: f[4].trim().to_string(),
                                },
                            );
                        }
                    }
                }
            }
            _ => {
                return Err(err(
                    line,
                    "expected 'set<TAB>name<TAB>members' or 'rule<TAB>left<TAB>right<TAB>severity<TAB>source<TAB>summary'".into(),
                ))
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_tables_parse() {
        let t = DrugTable::embedded();
        assert!(t.products().count() >= 80);
        assert!(t.interactions().count() > 1150);
    }

    #[test]
    fn meperidine_50mg_is_schedule_ii_opioid_with_mme_factor_0_1() {
        let p = DrugTable::embedded().product("861467").unwrap();
        assert_eq!(p.schedule, Some(Schedule::II));
        assert!(p.has_class("opioid"));
        assert_eq!(p.mme_factor, Some(0.1));
        assert_eq!(p.strength_mg, Some(50.0));
        assert_eq!(p.ingredients, ["meperidine"]);
    }

    #[test]
    fn diazepam_5mg_is_schedule_iv_benzodiazepine() {
        let p = DrugTable::embedded().product("197591").unwrap();
        assert_eq!(p.schedule, Some(Schedule::IV));
        assert!(p.has_class("benzodiazepine"));
        assert!(p.is_controlled());
        assert_eq!(p.mme_factor, None);
    }

    #[test]
    fn cdc_2022_mme_factors_are_in_the_table() {
        let t = DrugTable::embedded();
        let factor = |ingredient: &str| {
            t.products()
                .filter(|p| p.has_class("opioid") && p.has_ingredient(ingredient))
                .map(|p| p.mme_factor)
                .collect::<Vec<_>>()
        };
        for (ingredient, f) in [
            ("codeine", 0.15),
            ("fentanyl", 2.4),
            ("hydrocodone", 1.0),
            ("hydromorphone", 5.0),
            ("methadone", 4.7),
            ("morphine", 1.0),
            ("oxycodone", 1.5),
            ("oxymorphone", 3.0),
            ("tapentadol", 0.4),
            ("tramadol", 0.2),
            ("meperidine", 0.1),
        ] {
            let found = factor(ingredient);
            assert!(!found.is_empty(), "no opioid product with {ingredient}");
            assert!(
                found.iter().all(|x| *x == Some(f)),
                "{ingredient}: {found:?}"
            );
        }
        // The guideline gives buprenorphine no MME factor.
        assert!(factor("buprenorphine").iter().all(|x| x.is_none()));
    }

    #[test]
    fn common_controlled_substances_are_in_the_table_with_their_schedule() {
        let t = DrugTable::embedded();
        for (ingredient, schedule) in [
            ("oxycodone", Schedule::II),
            ("hydrocodone", Schedule::II),
            ("morphine", Schedule::II),
            ("fentanyl", Schedule::II),
            ("meperidine", Schedule::II),
            ("codeine", Schedule::III),
            ("tramadol", Schedule::IV),
            ("buprenorphine", Schedule::III),
            ("alprazolam", Schedule::IV),
            ("diazepam", Schedule::IV),
            ("lorazepam", Schedule::IV),
            ("clonazepam", Schedule::IV),
            ("zolpidem", Schedule::IV),
            ("amphetamine", Schedule::II),
            ("methylphenidate", Schedule::II),
        ] {
            let products: Vec<_> = t
                .products()
                .filter(|p| p.has_ingredient(ingredient))
                .collect();
            assert!(!products.is_empty(), "{ingredient} missing");
            assert!(
                products.iter().all(|p| p.schedule == Some(schedule)),
                "{ingredient} not all {schedule}"
            );
        }
    }

    #[test]
    fn fentanyl_patch_strength_is_in_mcg_per_hour() {
        let p = DrugTable::embedded().product("245134").unwrap();
        assert!(p.is_patch());
        assert_eq!(p.strength_mg, Some(25.0));
    }

    #[test]
    fn interaction_is_found_in_either_order() {
        let t = DrugTable::embedded();
        let i = t.interaction("simvastatin", "clarithromycin").unwrap();
        assert_eq!(i.severity, Severity::High);
        assert_eq!(i.source, "onc-high-priority");
        assert_eq!(
            t.interaction("Clarithromycin", "simvastatin")
                .unwrap()
                .summary,
            i.summary
        );
    }

    #[test]
    fn meperidine_with_an_maoi_is_an_onc_pair() {
        let i = DrugTable::embedded()
            .interaction("meperidine", "phenelzine")
            .unwrap();
        assert_eq!(i.severity, Severity::High);
    }

    #[test]
    fn warfarin_with_an_nsaid_is_a_moderate_clinical_rule() {
        let i = DrugTable::embedded()
            .interaction("warfarin", "ibuprofen")
            .unwrap();
        assert_eq!(i.severity, Severity::Moderate);
        assert_eq!(i.source, "clinical");
    }

    #[test]
    fn unrelated_drugs_and_the_same_drug_have_no_interaction() {
        let t = DrugTable::embedded();
        assert!(t.interaction("lisinopril", "metformin").is_none());
        assert!(t.interaction("amiodarone", "amiodarone").is_none());
    }

    #[test]
    fn higher_severity_wins_when_two_rules_give_the_same_pair() {
        let drugs = "1\tx\ta\t-\t-\t-\ttablet\t-\n";
        let rules = "rule\ta\tb\tmoderate\tclinical\tfirst\nrule\tb\ta\thigh\tonc\tsecond\nrule\ta\tb\tlow\tclinical\tthird\n";
        let t = DrugTable::parse(drugs, rules).unwrap();
        let i = t.interaction("a", "b").unwrap();
        assert_eq!((i.severity, i.summary.as_str()), (Severity::High, "second"));
    }

    #[test]
    fn malformed_table_lines_are_reported_with_file_and_line() {
        let e = DrugTable::parse("# c\n1\tx\ta\t-\tCVI\t-\ttablet\t-\n", "").unwrap_err();
        assert_eq!((e.file, e.line), ("drugs.tsv", 2));
        let e = DrugTable::parse("", "rule\ta\tb\tsevere\tx\ty\n").unwrap_err();
        assert_eq!((e.file, e.line), ("interactions.tsv", 1));
    }
}
