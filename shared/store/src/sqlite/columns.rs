//! The audit table's searchable columns (`event_id`, `at`, `subject`, `action`, `resource_id`,
//! `patient`, `break_glass`) checked against the hashed body they were copied from.
//!
//! Searches filter on the columns, the hash chain covers only the body: a column edited in the
//! file would make a search miss the event while the chain still verifies. Verification reads the
//! columns beside the body and compares them.
//!
//! The body is the compact JSON `AuditEvent::canonical_bytes` wrote, its fields in declaration
//! order. The fast path walks that exact layout and compares each column with the bytes of its
//! value in place (no parse, no allocation); it only answers "all equal". Anything else (an
//! escaped string, another layout, a real difference) goes to the slow path, a full JSON parse
//! that says which column differs. Neither judges the rest of the body: the hash chain and the
//! checkpoints vouch for it.

use chrono::{DateTime, SecondsFormat, Utc};
use rusqlite::types::ValueRef;
use rx_guard::audit::ChainedEvent;

use crate::port::RowFault;

/// The columns the checked read selects after `seq, body, prev, hash`, in this order.
pub(crate) const NAMES: [&str; 7] = [
    "event_id",
    "at",
    "subject",
    "action",
    "resource_id",
    "patient",
    "break_glass",
];

/// Index of the first searchable column in the checked read's row.
pub(crate) const FIRST: usize = 4;

/// The checked read: the chained event, then the searchable columns in [`NAMES`] order.
pub(crate) const AUDIT_RANGE_CHECKED: &str =
    "SELECT seq, body, prev, hash, event_id, at, subject, action, resource_id, patient, break_glass
     FROM audit WHERE seq >= ?1 ORDER BY seq LIMIT ?2";

/// The fault of one row of [`AUDIT_RANGE_CHECKED`], whose chained event is `ev`, if any.
pub(crate) fn fault(
    r: &rusqlite::Row<'_>,
    ev: &ChainedEvent,
) -> rusqlite::Result<Option<RowFault>> {
    let mut cols = [ValueRef::Null; 7];
    for (i, c) in cols.iter_mut().enumerate() {
        *c = r.get_ref(FIRST + i)?;
    }
    Ok(match compare(&ev.body, &cols) {
        Verdict::Equal => None,
        Verdict::Differs(column) => Some(RowFault::Mismatch {
            seq: ev.seq,
            column,
        }),
        Verdict::Unreadable(reason) => Some(RowFault::Unreadable {
            seq: ev.seq,
            reason,
        }),
    })
}

/// What the comparison found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    Equal,
    /// This column (a [`NAMES`] entry) does not hold the body's value.
    Differs(&'static str),
    /// The body is not JSON: the reason names its category and position, never its text.
    Unreadable(String),
}

/// Compares one row's searchable columns (in [`NAMES`] order) with its body.
pub(crate) fn compare(body: &[u8], cols: &[ValueRef<'_>; 7]) -> Verdict {
    if fast_equal(body, cols).is_some() {
        return Verdict::Equal;
    }
    slow(body, cols)
}

/// `Some(())` only when `body` has the canonical layout and every column equals its value.
fn fast_equal(body: &[u8], cols: &[ValueRef<'_>; 7]) -> Option<()> {
    let [event_id, at, subject, action, resource_id, patient, break_glass] = cols;
    let mut c = Cursor { b: body, i: 0 };
    c.lit(b"{\"id\":")?;
    c.string_eq(text(event_id)?)?;
    c.lit(b",\"at\":")?;
    same_instant(c.string()?, text(at)?)?;
    c.lit(b",\"actor\":{\"subject\":")?;
    c.string_eq(text(subject)?)?;
    c.lit(b",\"role\":")?;
    c.string()?;
    c.lit(b",\"tenant\":")?;
    c.string()?;
    c.lit(b"},\"action\":")?;
    c.string_eq(text(action)?)?;
    c.lit(b",\"resource\":{\"kind\":")?;
    c.string()?;
    c.lit(b",\"id\":")?;
    c.string_eq(text(resource_id)?)?;
    c.lit(b"}")?;
    match patient {
        ValueRef::Null => {}
        p => {
            c.lit(b",\"patient\":")?;
            c.string_eq(text(p)?)?;
        }
    }
    c.lit(b",\"function\":")?;
    c.string()?;
    if c.opt(b",\"source_ip\":") {
        c.string()?;
    }
    c.lit(b",\"outcome\":")?;
    c.string()?;
    c.lit(b",\"purpose\":")?;
    c.string()?;
    c.lit(b",\"break_glass\":")?;
    match break_glass {
        ValueRef::Integer(1) => c.lit(b"true")?,
        ValueRef::Integer(0) => c.lit(b"false")?,
        _ => return None,
    }
    if c.opt(b",\"detail\":") {
        c.string()?;
    }
    c.lit(b"}")?;
    (c.i == body.len()).then_some(())
}

/// A read position in the body.
struct Cursor<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Cursor<'a> {
    fn lit(&mut self, s: &[u8]) -> Option<()> {
        self.opt(s).then_some(())
    }

    fn opt(&mut self, s: &[u8]) -> bool {
        let hit = self.b[self.i..].starts_with(s);
        if hit {
            self.i += s.len();
        }
        hit
    }

    /// A JSON string with no escape in it; its contents.
    fn string(&mut self) -> Option<&'a [u8]> {
        self.lit(b"\"")?;
        let start = self.i;
        loop {
            match *self.b.get(self.i)? {
                b'"' => break,
                // An escape, or a control byte (invalid JSON): the slow path decides.
                b'\\' | 0..0x20 => return None,
                _ => self.i += 1,
            }
        }
        let s = &self.b[start..self.i];
        self.i += 1;
        Some(s)
    }

    /// A JSON string whose contents are exactly `want`: the bytes `"want"`, and `want` holds
    /// nothing that would end or escape a JSON string early.
    fn string_eq(&mut self, want: &[u8]) -> Option<()> {
        if ends_or_escapes(want) {
            return None;
        }
        self.lit(b"\"")?;
        self.lit(want)?;
        self.lit(b"\"")
    }
}

/// Whether `s` holds a quote, a backslash or a control byte. No early exit, so it vectorizes:
/// the values are short and almost never hold one.
fn ends_or_escapes(s: &[u8]) -> bool {
    s.iter().fold(false, |any, &b| {
        any | (b == b'"') | (b == b'\\') | (b < 0x20)
    })
}

/// A text column as a string.
fn as_text<'v>(col: &ValueRef<'v>) -> Option<&'v str> {
    text(col).and_then(|t| std::str::from_utf8(t).ok())
}

/// A text column's bytes; any other storage class cannot equal a JSON string.
fn text<'v>(v: &ValueRef<'v>) -> Option<&'v [u8]> {
    match v {
        ValueRef::Text(t) => Some(t),
        _ => None,
    }
}

/// The body's RFC 3339 UTC time (`…:SS`, then none, 3, 6 or 9 fraction digits, `Z`) and the
/// column's (always 9 fraction digits, `Z`) name the same instant.
fn same_instant(body: &[u8], col: &[u8]) -> Option<()> {
    let (b_main, b_frac) = split_time(body)?;
    let (c_main, c_frac) = split_time(col)?;
    if b_main != c_main || c_frac.len() != 9 || b_frac.len() > 9 {
        return None;
    }
    let (head, rest) = c_frac.split_at(b_frac.len());
    (head == b_frac && rest.iter().all(|&d| d == b'0')).then_some(())
}

/// `(everything before the fraction, the fraction digits)` of a time ending in `Z`.
fn split_time(t: &[u8]) -> Option<(&[u8], &[u8])> {
    let t = t.strip_suffix(b"Z")?;
    let (main, frac) = match t.iter().rposition(|&b| b == b'.') {
        Some(dot) => (&t[..dot], &t[dot + 1..]),
        None => (t, &t[t.len()..]),
    };
    frac.iter().all(u8::is_ascii_digit).then_some((main, frac))
}

/// The general comparison: parse the body and compare each column with its value, in
/// [`NAMES`] order. Rare (only rows the fast path could not vouch for), so it may allocate.
fn slow(body: &[u8], cols: &[ValueRef<'_>; 7]) -> Verdict {
    let v: serde_json::Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            return Verdict::Unreadable(format!(
                "{:?} error at line {} column {}",
                e.classify(),
                e.line(),
                e.column()
            ))
        }
    };
    let field = |path: &[&str]| path.iter().try_fold(&v, |v, k| v.get(k));
    let string_is = |path: &[&str], col: &ValueRef<'_>| {
        let body_value = field(path).and_then(serde_json::Value::as_str);
        body_value.is_some() && body_value == as_text(col)
    };
    // The column holds the body's instant in the store's fixed-width form (text order is time
    // order), as the writer put it.
    let at_is = |col: &ValueRef<'_>| {
        let Some(serde_json::Value::String(s)) = field(&["at"]) else {
            return false;
        };
        let Ok(at) = DateTime::parse_from_rfc3339(s) else {
            return false;
        };
        let at = at.with_timezone(&Utc);
        as_text(col) == Some(at.to_rfc3339_opts(SecondsFormat::Nanos, true).as_str())
    };
    let checks: [bool; 7] = [
        string_is(&["id"], &cols[0]),
        at_is(&cols[1]),
        string_is(&["actor", "subject"], &cols[2]),
        string_is(&["action"], &cols[3]),
        string_is(&["resource", "id"], &cols[4]),
        match (field(&["patient"]), &cols[5]) {
            (None | Some(serde_json::Value::Null), ValueRef::Null) => true,
            (Some(_), c) => string_is(&["patient"], c),
            _ => false,
        },
        // Absent means false (the body type's default).
        {
            let body_flag = match field(&["break_glass"]) {
                None => Some(false),
                Some(v) => v.as_bool(),
            };
            let col_flag = match cols[6] {
                ValueRef::Integer(0) => Some(false),
                ValueRef::Integer(1) => Some(true),
                _ => None,
            };
            body_flag.is_some() && body_flag == col_flag
        },
    ];
    match checks.iter().position(|ok| !ok) {
        Some(i) => Verdict::Differs(NAMES[i]),
        None => Verdict::Equal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use rx_guard::audit::{Action, Actor, AuditEvent, Purpose, ResourceRef};

    fn event() -> AuditEvent {
        let mut e = AuditEvent::new(
            Actor {
                subject: "auth0|abc".into(),
                role: "pharmacist".into(),
                tenant: "t1".into(),
            },
            Action::BreakGlass,
            ResourceRef {
                kind: "MedicationRequest".into(),
                id: "rx-1".into(),
            },
            "records",
            Purpose::Emergency,
        );
        e.at = Utc.with_ymd_and_hms(2026, 12, 1, 9, 0, 0).unwrap();
        e.patient = Some("ab".repeat(32));
        e.source_ip = Some("10.0.0.1".into());
        e.break_glass = true;
        e.detail = Some("rule DUR-1".into());
        e
    }

    /// The columns as the writer stores them.
    fn columns(e: &AuditEvent) -> Vec<rusqlite::types::Value> {
        use rusqlite::types::Value;
        vec![
            Value::Text(e.id.clone()),
            Value::Text(e.at.to_rfc3339_opts(SecondsFormat::Nanos, true)),
            Value::Text(e.actor.subject.clone()),
            Value::Text(e.action.as_str().into()),
            Value::Text(e.resource.id.clone()),
            e.patient.clone().map_or(Value::Null, Value::Text),
            Value::Integer(i64::from(e.break_glass)),
        ]
    }

    fn refs(v: &[rusqlite::types::Value]) -> [ValueRef<'_>; 7] {
        std::array::from_fn(|i| ValueRef::from(&v[i]))
    }

    #[test]
    fn canonical_rows_are_equal_on_the_fast_path() {
        let mut e = event();
        for (patient, ip, detail, bg, nanos) in [
            (true, true, true, true, 0),
            (false, false, false, false, 123_000_000),
            (true, false, true, false, 123_456_000),
            (false, true, false, true, 123_456_789),
        ] {
            e.patient = patient.then(|| "cd".repeat(32));
            e.source_ip = ip.then(|| "10.0.0.2".into());
            e.detail = detail.then(|| "note".into());
            e.break_glass = bg;
            e.at = Utc.with_ymd_and_hms(2026, 12, 1, 9, 0, 0).unwrap()
                + chrono::Duration::nanoseconds(nanos);
            let body = e.canonical_bytes();
            let cols = columns(&e);
            assert_eq!(fast_equal(&body, &refs(&cols)), Some(()), "{e:?}");
            assert_eq!(slow(&body, &refs(&cols)), Verdict::Equal, "{e:?}");
        }
    }

    #[test]
    fn escaped_values_are_compared_on_the_slow_path() {
        let mut e = event();
        e.actor.subject = "cli:o\"neil\\x".into();
        e.detail = Some("said \"hi\"".into());
        let body = e.canonical_bytes();
        let cols = columns(&e);
        assert_eq!(fast_equal(&body, &refs(&cols)), None);
        assert_eq!(compare(&body, &refs(&cols)), Verdict::Equal);
    }

    #[test]
    fn each_edited_column_is_named() {
        use rusqlite::types::Value;
        let e = event();
        let body = e.canonical_bytes();
        let edits: [(usize, Value); 9] = [
            (
                0,
                Value::Text("019ae000-0000-7000-8000-000000000009".into()),
            ),
            (1, Value::Text("2026-12-01T09:00:01.000000000Z".into())),
            (2, Value::Text("innocent".into())),
            (3, Value::Text("read".into())),
            (4, Value::Text("rx-2".into())),
            (5, Value::Null),
            (5, Value::Text("00".repeat(32))),
            (6, Value::Integer(0)),
            (6, Value::Integer(2)),
        ];
        for (i, v) in edits {
            let mut cols = columns(&e);
            cols[i] = v;
            assert_eq!(
                compare(&body, &refs(&cols)),
                Verdict::Differs(NAMES[i]),
                "{}",
                NAMES[i]
            );
        }
        // A text column stored as a blob does not match a search by text either.
        let mut cols = columns(&e);
        cols[2] = Value::Blob(b"auth0|abc".to_vec());
        assert_eq!(compare(&body, &refs(&cols)), Verdict::Differs("subject"));
        // A patient column where the body names none.
        let mut none = e.clone();
        none.patient = None;
        let cols = columns(&e);
        assert_eq!(
            compare(&none.canonical_bytes(), &refs(&cols)),
            Verdict::Differs("patient")
        );
    }

    #[test]
    fn a_body_that_is_not_json_is_unreadable_without_quoting_it() {
        let cols = columns(&event());
        match compare(b"{\"id\":\"secret", &refs(&cols)) {
            Verdict::Unreadable(why) => assert!(!why.contains("secret"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn times_compare_as_instants() {
        let col = b"2026-12-01T09:00:00.120000000Z";
        assert_eq!(same_instant(b"2026-12-01T09:00:00.120Z", col), Some(()));
        assert_eq!(same_instant(b"2026-12-01T09:00:00.12Z", col), Some(()));
        assert_eq!(same_instant(b"2026-12-01T09:00:00.121Z", col), None);
        assert_eq!(
            same_instant(b"2026-12-01T09:00:00Z", b"2026-12-01T09:00:00.000000000Z"),
            Some(())
        );
        assert_eq!(
            same_instant(b"2026-12-01T09:00:00Z", b"2026-12-01T09:00:00Z"),
            None,
            "the column always has nine fraction digits"
        );
    }
}
