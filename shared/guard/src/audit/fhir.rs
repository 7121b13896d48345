//! Export of audit events as FHIR R4 AuditEvent resources (one JSON object per event, for NDJSON).
//!
//! The export carries what the event carries and nothing more: people by JWT subject, records by
//! rxflow id, the patient by blind index. Break-glass events are marked three ways a FHIR reader
//! may look: purposeOfEvent ETREAT, the security label BTG on `meta.security`, and the agent's
//! policy `urn:rxflow:policy:break-glass`.

use serde_json::{json, Value};

use super::{Action, AuditEvent, Outcome};

const DCM: &str = "http://dicom.nema.org/resources/ontology/DCM";
const RESTFUL: &str = "http://hl7.org/fhir/restful-interaction";
const PURPOSE: &str = "http://terminology.hl7.org/CodeSystem/v3-ActReason";
const ACT_CODE: &str = "http://terminology.hl7.org/CodeSystem/v3-ActCode";
const AGENT_TYPE: &str = "http://terminology.hl7.org/CodeSystem/extra-security-role-type";
const SOURCE_TYPE: &str = "http://terminology.hl7.org/CodeSystem/security-source-type";
const ENTITY_TYPE: &str = "http://terminology.hl7.org/CodeSystem/audit-entity-type";
const OBJECT_ROLE: &str = "http://terminology.hl7.org/CodeSystem/object-role";
const RX_ACTION: &str = "urn:rxflow:audit-action";
const RX_ROLE: &str = "urn:rxflow:role";
const RX_FUNCTION: &str = "urn:rxflow:function";
const RX_BLIND_INDEX: &str = "urn:rxflow:blind-index:patient";
const RX_SEQ_EXT: &str = "urn:rxflow:fhir:extension:audit-seq";
const RX_BREAK_GLASS_EXT: &str = "urn:rxflow:fhir:extension:break-glass";
const BREAK_GLASS_POLICY: &str = "urn:rxflow:policy:break-glass";

/// FHIR resource types an event's resource kind can be referenced as (`Kind/id`).
const FHIR_KINDS: [&str; 5] = [
    "MedicationRequest",
    "MedicationDispense",
    "Patient",
    "Practitioner",
    "AuditEvent",
];

fn coding(system: &str, code: &str, display: &str) -> Value {
    json!({ "system": system, "code": code, "display": display })
}

/// The AuditEvent.type: what kind of event, in DICOM terms.
fn event_type(e: &AuditEvent) -> Value {
    match e.action {
        Action::Disclose => coding(DCM, "110106", "Export"),
        Action::BreakGlass => coding(DCM, "110113", "Security Alert"),
        Action::Login => coding(DCM, "110114", "User Authentication"),
        _ if e.resource.kind == "AuditEvent" => coding(DCM, "110101", "Audit Log Used"),
        _ => coding(DCM, "110110", "Patient Record"),
    }
}

/// The AuditEvent.action code: C create, R read, U update, D delete, E execute.
fn action_code(a: Action) -> &'static str {
    match a {
        Action::Create | Action::Quarantine => "C",
        Action::Read | Action::Decrypt | Action::Disclose => "R",
        Action::Update => "U",
        Action::Deny | Action::BreakGlass | Action::Login => "E",
    }
}

fn subtypes(a: Action) -> Vec<Value> {
    let mut out = Vec::new();
    let rest = match a {
        Action::Create => Some(("create", "create")),
        Action::Read => Some(("read", "read")),
        Action::Update => Some(("update", "update")),
        _ => None,
    };
    if let Some((code, display)) = rest {
        out.push(coding(RESTFUL, code, display));
    }
    if a == Action::Login {
        out.push(coding(DCM, "110122", "Login"));
    }
    out.push(coding(RX_ACTION, a.as_str(), a.as_str()));
    out
}

fn outcome_code(o: Outcome) -> &'static str {
    match o {
        Outcome::Success => "0",
        Outcome::Denied => "4",
        Outcome::Failed => "8",
    }
}

/// `AuditEvent.recorded` is an instant: seconds precision at least, with a zone.
fn instant(e: &AuditEvent) -> String {
    e.at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn agent(e: &AuditEvent) -> Value {
    let system_actor = e.actor.role == "service" || e.actor.subject.starts_with("system:");
    let kind = if system_actor {
        coding(AGENT_TYPE, "dataprocessor", "data processor")
    } else {
        coding(AGENT_TYPE, "humanuser", "human user")
    };
    let mut agent = json!({
        "type": { "coding": [kind] },
        "role": [{ "coding": [coding(RX_ROLE, &e.actor.role, &e.actor.role)], "text": e.actor.role }],
        "who": {
            "identifier": {
                "system": format!("urn:rxflow:tenant:{}:subject", e.actor.tenant),
                "value": e.actor.subject,
            }
        },
        "requestor": true,
    });
    if let Some(ip) = &e.source_ip {
        // 2 = IP address (network-type).
        agent["network"] = json!({ "address": ip, "type": "2" });
    }
    if e.break_glass {
        agent["policy"] = json!([BREAK_GLASS_POLICY]);
    }
    agent
}

fn entities(e: &AuditEvent) -> Vec<Value> {
    let what = if FHIR_KINDS.contains(&e.resource.kind.as_str()) {
        json!({ "reference": format!("{}/{}", e.resource.kind, e.resource.id) })
    } else {
        json!({
            "identifier": { "system": format!("urn:rxflow:{}", e.resource.kind), "value": e.resource.id },
            "display": e.resource.kind,
        })
    };
    let mut out = vec![json!({
        "what": what,
        // 2 = system object, 4 = domain resource
        "type": coding(ENTITY_TYPE, "2", "System Object"),
        "role": coding(OBJECT_ROLE, "4", "Domain Resource"),
    })];
    if let Some(patient) = &e.patient {
        out.push(json!({
            "what": { "identifier": { "system": RX_BLIND_INDEX, "value": patient } },
            "type": coding(ENTITY_TYPE, "1", "Person"),
            "role": coding(OBJECT_ROLE, "1", "Patient"),
        }));
    }
    out
}

/// The FHIR R4 AuditEvent for event `e`, stored at position `seq` of the trail.
pub fn to_fhir(e: &AuditEvent, seq: u64) -> Value {
    let mut purposes =
        vec![json!({ "coding": [coding(PURPOSE, e.purpose.code(), e.purpose.code())] })];
    if e.break_glass && e.purpose.code() != "ETREAT" {
        purposes.push(json!({ "coding": [coding(PURPOSE, "ETREAT", "emergency treatment")] }));
    }
    let mut extensions = vec![json!({ "url": RX_SEQ_EXT, "valueString": seq.to_string() })];
    if e.break_glass {
        extensions.push(json!({ "url": RX_BREAK_GLASS_EXT, "valueBoolean": true }));
    }
    let mut out = json!({
        "resourceType": "AuditEvent",
        "id": e.id,
        "extension": extensions,
        "type": event_type(e),
        "subtype": subtypes(e.action),
        "action": action_code(e.action),
        "recorded": instant(e),
        "outcome": outcome_code(e.outcome),
        "purposeOfEvent": purposes,
        "agent": [agent(e)],
        "source": {
            "site": e.actor.tenant,
            "observer": {
                "identifier": { "system": RX_FUNCTION, "value": e.function },
                "display": format!("rxflow {}", e.function),
            },
            "type": [coding(SOURCE_TYPE, "4", "Application Server")],
        },
        "entity": entities(e),
    });
    if let Some(detail) = &e.detail {
        out["outcomeDesc"] = Value::String(detail.clone());
    }
    if e.break_glass {
        out["meta"] = json!({ "security": [coding(ACT_CODE, "BTG", "break the glass")] });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{Actor, Purpose, ResourceRef};

    fn event(action: Action) -> AuditEvent {
        AuditEvent::new(
            Actor {
                subject: "pharm-1".into(),
                role: "pharmacist".into(),
                tenant: "acme".into(),
            },
            action,
            ResourceRef {
                kind: "MedicationRequest".into(),
                id: "0190a5b2-0000-7000-8000-000000000001".into(),
            },
            "records",
            Purpose::Treatment,
        )
    }

    #[test]
    fn actions_map_to_fhir_crude_codes() {
        assert_eq!(to_fhir(&event(Action::Create), 1)["action"], "C");
        assert_eq!(to_fhir(&event(Action::Read), 1)["action"], "R");
        assert_eq!(to_fhir(&event(Action::Update), 1)["action"], "U");
        assert_eq!(to_fhir(&event(Action::BreakGlass), 1)["action"], "E");
    }

    #[test]
    fn outcomes_map_to_fhir_severity_codes() {
        let mut e = event(Action::Read);
        e.outcome = Outcome::Denied;
        assert_eq!(to_fhir(&e, 1)["outcome"], "4");
        e.outcome = Outcome::Failed;
        assert_eq!(to_fhir(&e, 1)["outcome"], "8");
        e.outcome = Outcome::Success;
        assert_eq!(to_fhir(&e, 1)["outcome"], "0");
    }

    #[test]
    fn break_glass_event_is_marked_with_etreat_btg_and_policy() {
        let mut e = event(Action::Read);
        e.break_glass = true;
        let f = to_fhir(&e, 7);
        let purposes = f["purposeOfEvent"].to_string();
        assert!(
            purposes.contains("ETREAT") && purposes.contains("TREAT"),
            "{purposes}"
        );
        assert_eq!(f["meta"]["security"][0]["code"], "BTG");
        assert_eq!(f["agent"][0]["policy"][0], BREAK_GLASS_POLICY);
        let plain = to_fhir(&event(Action::Read), 7);
        assert!(plain.get("meta").is_none());
        assert!(!plain["purposeOfEvent"].to_string().contains("ETREAT"));
    }
}
