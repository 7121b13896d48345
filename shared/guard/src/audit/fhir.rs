pub fn to_fhir(_e: &super::AuditEvent, _seq: u64) -> serde_json::Value { serde_json::Value::Null }
