//! Typed access to FHIR JSON that never panics and names the path of whatever is wrong.
//!
//! Absent and `null` both count as "not given" (FHIR forbids `null`, but real senders emit it).
//! A value of the wrong JSON type is an error: silently ignoring it would hide a broken order.

use super::FhirError;
use chrono::{DateTime, NaiveDate, NaiveTime, TimeZone, Utc};
use serde_json::{Map, Value};

pub(crate) type Obj = Map<String, Value>;

pub(crate) fn err(path: impl Into<String>, message: impl Into<String>) -> FhirError {
    FhirError {
        path: path.into(),
        message: message.into(),
    }
}

/// `path.key`, built only when an error needs it.
pub(crate) fn at(path: &str, key: &str) -> String {
    format!("{path}.{key}")
}

pub(crate) fn get<'a>(o: &'a Obj, key: &str) -> Option<&'a Value> {
    o.get(key).filter(|v| !v.is_null())
}

pub(crate) fn as_obj<'a>(v: &'a Value, path: &str) -> Result<&'a Obj, FhirError> {
    v.as_object()
        .ok_or_else(|| err(path, "must be a JSON object"))
}

pub(crate) fn opt_obj<'a>(o: &'a Obj, key: &str, path: &str) -> Result<Option<&'a Obj>, FhirError> {
    match get(o, key) {
        None => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m)),
        Some(_) => Err(err(at(path, key), "must be a JSON object")),
    }
}

pub(crate) fn opt_str<'a>(o: &'a Obj, key: &str, path: &str) -> Result<Option<&'a str>, FhirError> {
    match get(o, key) {
        None => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.as_str())),
        Some(_) => Err(err(at(path, key), "must be a JSON string")),
    }
}

pub(crate) fn opt_num(o: &Obj, key: &str, path: &str) -> Result<Option<f64>, FhirError> {
    match get(o, key) {
        None => Ok(None),
        Some(Value::Number(n)) => n
            .as_f64()
            .filter(|f| f.is_finite())
            .map(Some)
            .ok_or_else(|| err(at(path, key), "must be a finite number")),
        Some(_) => Err(err(at(path, key), "must be a JSON number")),
    }
}

pub(crate) fn opt_u32(o: &Obj, key: &str, path: &str) -> Result<Option<u32>, FhirError> {
    match get(o, key) {
        None => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|u| u32::try_from(u).ok())
            .map(Some)
            .ok_or_else(|| err(at(path, key), "must be a whole number, zero or more")),
        Some(_) => Err(err(at(path, key), "must be a JSON number")),
    }
}

pub(crate) fn opt_bool(o: &Obj, key: &str, path: &str) -> Result<Option<bool>, FhirError> {
    match get(o, key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(err(at(path, key), "must be true or false")),
    }
}

/// The elements of an array of objects (absent → empty), each with its index for error paths.
pub(crate) fn objs<'a>(
    o: &'a Obj,
    key: &str,
    path: &str,
) -> Result<impl Iterator<Item = (usize, &'a Obj)> + 'a, FhirError> {
    let items: &'a [Value] = match get(o, key) {
        None => &[],
        Some(Value::Array(a)) => a.as_slice(),
        Some(_) => return Err(err(at(path, key), "must be a JSON array")),
    };
    if let Some(i) = items.iter().position(|v| !v.is_object()) {
        return Err(err(format!("{path}.{key}[{i}]"), "must be a JSON object"));
    }
    Ok(items
        .iter()
        .enumerate()
        .filter_map(|(i, v)| v.as_object().map(|m| (i, m))))
}

/// The strings of an array of strings (absent → empty).
pub(crate) fn strs<'a>(o: &'a Obj, key: &str, path: &str) -> Result<Vec<&'a str>, FhirError> {
    match get(o, key) {
        None => Ok(Vec::new()),
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .filter(|(_, v)| !v.is_null())
            .map(|(i, v)| {
                v.as_str()
                    .ok_or_else(|| err(format!("{path}.{key}[{i}]"), "must be a JSON string"))
            })
            .collect(),
        Some(_) => Err(err(at(path, key), "must be a JSON array of strings")),
    }
}

const DATE_HINT: &str =
    "is not a FHIR date or dateTime: use YYYY-MM-DD or YYYY-MM-DDThh:mm:ss with a time zone (Z or +hh:mm)";

/// A FHIR date (YYYY, YYYY-MM, YYYY-MM-DD) as the first day it covers.
pub(crate) fn parse_date(s: &str, path: &str) -> Result<NaiveDate, FhirError> {
    let bad = || err(path, DATE_HINT);
    let digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    let parts: Vec<&str> = s.split('-').collect();
    let (y, m, d) = match parts.as_slice() {
        [y] if y.len() == 4 && digits(y) => (*y, "1", "1"),
        [y, m] if y.len() == 4 && m.len() == 2 && digits(y) && digits(m) => (*y, *m, "1"),
        [y, m, d]
            if y.len() == 4
                && m.len() == 2
                && d.len() == 2
                && digits(y)
                && digits(m)
                && digits(d) =>
        {
            (*y, *m, *d)
        }
        _ => return Err(bad()),
    };
    let (y, m, d) = (
        y.parse::<i32>().map_err(|_| bad())?,
        m.parse::<u32>().map_err(|_| bad())?,
        d.parse::<u32>().map_err(|_| bad())?,
    );
    NaiveDate::from_ymd_opt(y, m, d).ok_or_else(bad)
}

/// A FHIR date or dateTime as an instant. A date alone means midnight UTC at its start, or — for
/// the end of a period (`end_of_period`) — the last second of the day, since a period ending on a
/// date includes that day.
pub(crate) fn parse_instant(
    s: &str,
    path: &str,
    end_of_period: bool,
) -> Result<DateTime<Utc>, FhirError> {
    if s.contains('T') {
        return DateTime::parse_from_rfc3339(s)
            .map(|d| d.with_timezone(&Utc))
            .map_err(|_| err(path, DATE_HINT));
    }
    let date = parse_date(s, path)?;
    let time = if end_of_period {
        NaiveTime::from_hms_opt(23, 59, 59)
    } else {
        NaiveTime::from_hms_opt(0, 0, 0)
    }
    .ok_or_else(|| err(path, DATE_HINT))?;
    Ok(Utc.from_utc_datetime(&date.and_time(time)))
}

/// Decodes the `%XX` escapes a conditional reference may carry (`%7C` for `|`).
pub(crate) fn percent_decode(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.contains('%') {
        return std::borrow::Cow::Borrowed(s);
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = |b: u8| (b as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    std::borrow::Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}
