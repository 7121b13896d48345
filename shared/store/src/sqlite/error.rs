//! rusqlite errors as [`StoreError`]s. Messages name the operation and what to do; they never
//! carry bound values (sealed bytes, blind indexes) nor SQLite's own message text.

use rusqlite::ffi::ErrorCode;

use super::schema::APPEND_ONLY;
use crate::port::StoreError;

/// Maps an error raised while doing `what` (e.g. "committing a change set").
pub(crate) fn map(what: &str, err: rusqlite::Error) -> StoreError {
    match &err {
        rusqlite::Error::SqliteFailure(e, msg) => match e.code {
            ErrorCode::DiskFull => StoreError::Unavailable(format!(
                "{what}: the disk holding the store is full; free space and retry"
            )),
            ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked => {
                StoreError::Unavailable(format!(
                    "{what}: the store file is locked by another process; stop the other rxflow \
                 process using this data directory or retry later"
                ))
            }
            ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase => StoreError::Corrupt(format!(
                "{what}: the store file is damaged or is not an rxflow store; restore it from a \
                 backup"
            )),
            ErrorCode::ReadOnly | ErrorCode::PermissionDenied | ErrorCode::CannotOpen => {
                StoreError::Unavailable(format!(
                    "{what}: the store file cannot be opened for writing; check that the data \
                     directory exists and is writable by this user"
                ))
            }
            ErrorCode::SystemIoFailure => StoreError::Unavailable(format!(
                "{what}: the disk reported an I/O error; check the disk and retry"
            )),
            ErrorCode::OutOfMemory => StoreError::Unavailable(format!(
                "{what}: out of memory; retry with fewer concurrent requests"
            )),
            ErrorCode::ConstraintViolation
                if msg.as_deref().is_some_and(|m| m.contains(APPEND_ONLY)) =>
            {
                StoreError::Unavailable(format!(
                    "{what}: refused because the {APPEND_ONLY}; records in it are never changed \
                     or removed"
                ))
            }
            ErrorCode::ConstraintViolation => StoreError::Conflict(format!(
                "{what}: a record with the same id or source key already exists"
            )),
            code => StoreError::Unavailable(format!(
                "{what}: SQLite refused the operation ({code:?}, extended code {}); retry, and \
                 report it if it persists",
                e.extended_code
            )),
        },
        // Type and conversion errors mean a stored column does not hold what this version wrote.
        rusqlite::Error::FromSqlConversionFailure(..)
        | rusqlite::Error::IntegralValueOutOfRange(..)
        | rusqlite::Error::InvalidColumnType(..) => StoreError::Corrupt(format!(
            "{what}: a stored value has an unexpected type; the store was written by another \
             version or altered; restore it from a backup"
        )),
        _ => StoreError::Unavailable(format!(
            "{what}: the store failed ({}); retry, and report it if it persists",
            kind(&err)
        )),
    }
}

/// A short, value-free name of the error kind.
fn kind(err: &rusqlite::Error) -> &'static str {
    match err {
        rusqlite::Error::QueryReturnedNoRows => "no rows",
        rusqlite::Error::ExecuteReturnedResults => "statement returned rows",
        rusqlite::Error::ToSqlConversionFailure(_) => "value out of range",
        rusqlite::Error::InvalidParameterCount(..) => "wrong parameter count",
        rusqlite::Error::InvalidQuery => "invalid query",
        _ => "internal error",
    }
}
