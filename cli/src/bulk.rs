//! Reading a FHIR bulk-export folder (NDJSON, one resource a line) without holding it in memory.
//!
//! The first pass registers the directory resources (Practitioner, Patient, AllergyIntolerance)
//! and indexes each MedicationRequest by `authoredOn` with its file and byte offset; the second
//! pass reads the orders one at a time in that order. Memory follows the number of orders times a
//! few dozen bytes, not the size of the export.

use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use rx_domain::fhir::{self, FhirError, Resource};
use rx_domain::MedicationOrder;

#[derive(Debug, thiserror::Error)]
pub enum BulkError {
    #[error(
        "cannot read the export folder {path}: {source}; check the path: --input takes a folder of .ndjson files (a FHIR bulk export)"
    )]
    Folder {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds no .ndjson files; pass the folder of a FHIR bulk export")]
    Empty { path: String },
    #[error("cannot read {file}: {source}")]
    File {
        file: String,
        #[source]
        source: std::io::Error,
    },
}

/// A line that could not be used: where it is and why (never what it says).
#[derive(Debug, Clone)]
pub struct BadLine {
    pub file: String,
    pub line: u64,
    pub raw: String,
    pub error: String,
}

impl BadLine {
    pub fn origin(&self) -> String {
        format!("{}:{}", self.file, self.line)
    }
}

/// An order as read, with its line (kept for follow-up should intake refuse it).
pub struct OrderLine {
    pub order: MedicationOrder,
    /// The line it came from; `error` is empty until something refuses it.
    pub bad: BadLine,
}

/// Where one order is in the export.
#[derive(Debug, Clone, Copy)]
struct OrderAt {
    authored_on: Option<DateTime<Utc>>,
    file: u32,
    offset: u64,
    line: u64,
}

/// Where one directory resource (Practitioner, Patient, AllergyIntolerance) is.
#[derive(Debug, Clone, Copy)]
struct LineAt {
    file: u32,
    offset: u64,
    line: u64,
}

/// The index of an export's orders and directory resources.
#[derive(Debug)]
pub struct Export {
    files: Vec<PathBuf>,
    orders: Vec<OrderAt>,
    directory: Vec<LineAt>,
    /// Resource types present but not used by the pipeline (Organization, ...), with counts.
    pub skipped: Vec<(String, u64)>,
}

/// One line of a file with its position; `Err` holds a line that is not UTF-8 (lossily decoded,
/// to be kept for follow-up).
struct Line {
    offset: u64,
    number: u64,
    text: Result<String, String>,
}

fn lines(
    file: &Path,
    mut each: impl FnMut(Line) -> Result<(), BulkError>,
) -> Result<(), BulkError> {
    let err = |source| BulkError::File {
        file: file.display().to_string(),
        source,
    };
    let mut r = BufReader::with_capacity(1 << 16, File::open(file).map_err(err)?);
    let mut offset = 0u64;
    let mut number = 0u64;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = r.read_until(b'\n', &mut buf).map_err(err)?;
        if n == 0 {
            return Ok(());
        }
        number += 1;
        let start = offset;
        offset += n as u64;
        let text = match std::str::from_utf8(&buf) {
            Ok(t) => Ok(t.trim().to_string()),
            Err(_) => Err(String::from_utf8_lossy(&buf).trim().to_string()),
        };
        if text.as_ref().is_ok_and(|t| t.is_empty()) {
            continue;
        }
        each(Line {
            offset: start,
            number,
            text,
        })?;
    }
}

fn ndjson_files(dir: &Path) -> Result<Vec<PathBuf>, BulkError> {
    let folder_err = |source| BulkError::Folder {
        path: dir.display().to_string(),
        source,
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(folder_err)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        // Anything named *.ndjson is read: one that is not a readable file (a folder, a broken
        // link) stops the run with its name rather than being passed over.
        .filter(|p| {
            p.extension()
                .is_some_and(|x| x.eq_ignore_ascii_case("ndjson"))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(BulkError::Empty {
            path: dir.display().to_string(),
        });
    }
    Ok(files)
}

impl Export {
    /// First pass: index the orders (by `authoredOn`) and the directory resources; `bad` gets
    /// every line that could not be used, in file order.
    pub fn scan(dir: &Path, mut bad: impl FnMut(BadLine)) -> Result<Export, BulkError> {
        let files = ndjson_files(dir)?;
        let mut orders = Vec::new();
        let mut directory = Vec::new();
        let mut skipped: std::collections::BTreeMap<String, u64> = Default::default();
        for (fi, path) in files.iter().enumerate() {
            let name = file_name(path);
            let holds = file_type(&name);
            lines(path, |l| {
                let mut refuse = |raw: String, error: String| {
                    bad(BadLine {
                        file: name.clone(),
                        line: l.number,
                        raw,
                        error,
                    })
                };
                let text = match l.text {
                    Ok(t) => t,
                    Err(raw) => {
                        refuse(raw, "is not valid UTF-8: FHIR NDJSON is UTF-8 text".into());
                        return Ok(());
                    }
                };
                match fhir::parse_json(&text) {
                    // A bulk export file holds one resource type, the one its name gives: a line
                    // of another type is a mistake, not a resource to take in.
                    Ok(r) if holds.is_some_and(|t| t != r.type_name()) => refuse(
                        text,
                        format!(
                            "is a {} in a file of {} resources: each file of a bulk export holds \
                             the one resource type its name gives",
                            r.type_name(),
                            holds.unwrap_or_default()
                        ),
                    ),
                    Ok(Resource::MedicationRequest(o)) => orders.push(OrderAt {
                        authored_on: o.authored_on,
                        file: fi as u32,
                        offset: l.offset,
                        line: l.number,
                    }),
                    // A Bundle's orders would be lost if it were passed over as unused.
                    Ok(Resource::Other(kind)) if kind == "Bundle" => refuse(
                        text,
                        "is a Bundle: a bulk export holds one resource per line; export the \
                         Bundle's entries as lines, or POST the Bundle to /prescriptions"
                            .into(),
                    ),
                    Ok(Resource::Other(kind)) => *skipped.entry(kind).or_default() += 1,
                    Ok(_) => directory.push(LineAt {
                        file: fi as u32,
                        offset: l.offset,
                        line: l.number,
                    }),
                    Err(e) => refuse(text, e.to_string()),
                }
                Ok(())
            })?;
        }
        // Stable: orders written at the same instant keep their file order.
        orders.sort_by_key(|o| o.authored_on);
        Ok(Export {
            files,
            orders,
            directory,
            skipped: skipped.into_iter().collect(),
        })
    }

    /// Second pass, first part: the directory resources, one at a time, in file order, each
    /// with its line (kept for follow-up should registration refuse it).
    pub fn directory(&self) -> impl Iterator<Item = Result<(Resource, BadLine), BulkError>> + '_ {
        let mut reader = Reader::default();
        self.directory.iter().filter_map(move |at| {
            match reader.line(&self.files, at.file, at.offset) {
                // Parsed once already in the scan: a line that fails now changed meanwhile.
                Ok(text) => fhir::parse_json(text.trim()).ok().map(|r| {
                    Ok((
                        r,
                        BadLine {
                            file: file_name(&self.files[at.file as usize]),
                            line: at.line,
                            raw: text.trim().to_string(),
                            error: String::new(),
                        },
                    ))
                }),
                Err(e) => Some(Err(e)),
            }
        })
    }

    pub fn order_count(&self) -> usize {
        self.orders.len()
    }

    /// Second pass: the orders in `authoredOn` order.
    pub fn orders(
        &self,
    ) -> impl Iterator<Item = Result<Result<OrderLine, BadLine>, BulkError>> + '_ {
        let mut reader = Reader::default();
        self.orders.iter().map(move |at| {
            let text = reader.line(&self.files, at.file, at.offset)?;
            let path = &self.files[at.file as usize];
            Ok(fhir::parse_json(text.trim())
                .and_then(|r| match r {
                    Resource::MedicationRequest(order) => Ok(OrderLine {
                        order,
                        bad: BadLine {
                            file: file_name(path),
                            line: at.line,
                            raw: text.trim().to_string(),
                            error: String::new(),
                        },
                    }),
                    _ => Err(FhirError {
                        path: "resource.resourceType".into(),
                        message: "changed while the export was being read".into(),
                    }),
                })
                .map_err(|e| BadLine {
                    file: file_name(path),
                    line: at.line,
                    raw: text.trim().to_string(),
                    error: e.to_string(),
                }))
        })
    }
}

/// Reads single lines by offset, keeping the last file open.
#[derive(Default)]
struct Reader {
    open: Option<(u32, BufReader<File>)>,
}

impl Reader {
    fn line(&mut self, files: &[PathBuf], file: u32, offset: u64) -> Result<String, BulkError> {
        let path = &files[file as usize];
        let err = |source| BulkError::File {
            file: path.display().to_string(),
            source,
        };
        let (fi, mut r) = match self.open.take() {
            Some((fi, r)) if fi == file => (fi, r),
            _ => (file, BufReader::new(File::open(path).map_err(err)?)),
        };
        r.seek(SeekFrom::Start(offset)).map_err(err)?;
        let mut buf = Vec::new();
        r.read_until(b'\n', &mut buf).map_err(err)?;
        self.open = Some((fi, r));
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }
}

/// The resource type a bulk export file holds, from its name (`Patient.ndjson`,
/// `Patient.000.ndjson`, as the Bulk Data spec names them), if the name gives one.
fn file_type(name: &str) -> Option<&str> {
    let stem = name.split('.').next()?;
    let mut chars = stem.chars();
    (chars.next().is_some_and(|c| c.is_ascii_uppercase())
        && chars.all(|c| c.is_ascii_alphanumeric()))
    .then_some(stem)
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}
