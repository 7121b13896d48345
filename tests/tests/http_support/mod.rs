//! Test support for the HTTP tests: the real `rxflow serve` server started in-process on
//! 127.0.0.1:0 over a temporary data directory, dev tokens from that directory's issuer, a real
//! HTTP client, FHIR orders, and a capture of every log line the process writes.
#![allow(dead_code)]

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use chrono::Utc;
use rx_domain::Status;
use rx_guard::access::{DevClaims, DevIssuer, Role};
use rx_guard::audit::{Action, AuditEvent, AuditQuery};
use rx_platform::flow::load_rx;
use rx_platform::http::Limits;
use rx_platform::Services;
use rx_store::repo::AuditCtx;
use rxflow::serve::{self, ServeArgs};
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const TENANT: &str = "pharmacy-a";
pub const OTHER_TENANT: &str = "pharmacy-b";

pub const LISINOPRIL: &str = "314076";
pub const OXYCODONE_5: &str = "1049621";

/// The patient's name, SSN and street in every order: no log line and no response outside a
/// clinical view may carry them.
pub const PATIENT_GIVEN: &str = "Avery";
pub const PATIENT_FAMILY: &str = "Quinnelle";
pub const SSN: &str = "999-12-3456";
pub const STREET: &str = "12 Elm Street";
pub const PHI: [&str; 4] = [PATIENT_GIVEN, PATIENT_FAMILY, SSN, STREET];

/// A prescriber the tests know: NPI and DEA with valid check digits.
#[derive(Debug, Clone, Copy)]
pub struct Doctor {
    pub npi: &'static str,
    pub dea: &'static str,
    pub family: &'static str,
}

pub const DR_PUMP: Doctor = Doctor {
    npi: "1234567893",
    dea: "AP5836727",
    family: "Pump",
};
pub const DR_SMITH: Doctor = Doctor {
    npi: "1987654328",
    dea: "AS1234563",
    family: "Smith",
};

// ---------------------------------------------------------------------------------------------
// Log capture

static LOGS: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct Capture;

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut l) = LOGS.lock() {
            l.extend_from_slice(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Every log line of this test process goes to the capture (JSON, with the request span).
fn capture_logs() {
    static INIT: OnceLock<()> = OnceLock::new();
    INIT.get_or_init(|| {
        let _ = tracing_subscriber::fmt()
            .json()
            .with_current_span(true)
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                "debug,hyper=info,h2=info",
            ))
            .with_writer(|| Capture)
            .try_init();
    });
}

/// The log lines captured so far (of every test in this binary).
pub fn logs() -> String {
    let bytes = LOGS.lock().map(|l| l.clone()).unwrap_or_default();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Asserts that no captured log line carries the patient's name, SSN or street.
pub fn assert_logs_free_of_phi() {
    let logs = logs();
    assert!(!logs.is_empty(), "no log line was captured");
    for needle in PHI {
        if let Some(line) = logs.lines().find(|l| l.contains(needle)) {
            panic!("a log line carries PHI ({needle}): {line}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Who calls

/// A caller: role, subject, tenant, MFA, NPI.
#[derive(Debug, Clone)]
pub struct Who {
    pub role: Role,
    pub subject: String,
    pub tenant: String,
    pub mfa: bool,
    pub npi: Option<String>,
}

impl Who {
    pub fn new(role: Role, subject: &str) -> Self {
        Who {
            role,
            subject: subject.to_string(),
            tenant: TENANT.to_string(),
            mfa: true,
            npi: None,
        }
    }
    pub fn prescriber(subject: &str, d: Doctor) -> Self {
        Who {
            npi: Some(d.npi.to_string()),
            ..Who::new(Role::Prescriber, subject)
        }
    }
    pub fn pharmacist(subject: &str) -> Self {
        Who::new(Role::Pharmacist, subject)
    }
    pub fn without_mfa(mut self) -> Self {
        self.mfa = false;
        self
    }
    pub fn in_tenant(mut self, t: &str) -> Self {
        self.tenant = t.to_string();
        self
    }
}

// ---------------------------------------------------------------------------------------------
// Orders

/// A FHIR Bundle: Patient (name, SSN, address), Practitioner (NPI, DEA) and one MedicationRequest.
pub fn bundle(
    patient: &str,
    rxnorm: &str,
    display: &str,
    d: Doctor,
    quantity: f64,
    days: u32,
) -> Value {
    let authored = (Utc::now() - chrono::Duration::days(1)).to_rfc3339();
    let pat = format!("Patient/{patient}");
    let dr_url = format!("urn:uuid:{}", uuid::Uuid::now_v7());
    json!({"resourceType": "Bundle", "type": "collection", "entry": [
        {"resource": {
            "resourceType": "Patient", "id": patient,
            "identifier": [{"system": "http://hl7.org/fhir/sid/us-ssn", "value": SSN}],
            "name": [{"given": [PATIENT_GIVEN], "family": PATIENT_FAMILY}],
            "gender": "female", "birthDate": "1961-04-12",
            "address": [{"use": "home", "line": [STREET], "city": "Topeka", "state": "KS"}]
        }},
        {"fullUrl": dr_url, "resource": {
            "resourceType": "Practitioner",
            "identifier": [
                {"system": "http://hl7.org/fhir/sid/us-npi", "value": d.npi},
                {"system": "http://terminology.hl7.org/NamingSystem/DEANumber", "value": d.dea}
            ],
            "name": [{"family": d.family, "given": ["Pat"]}]
        }},
        {"resource": {
            "resourceType": "MedicationRequest", "id": format!("mr-{}", uuid::Uuid::now_v7()),
            "status": "active", "intent": "order",
            "medicationCodeableConcept": {"coding": [{
                "system": "http://www.nlm.nih.gov/research/umls/rxnorm",
                "code": rxnorm, "display": display}]},
            "subject": {"reference": pat},
            "authoredOn": authored,
            "requester": {"reference": dr_url},
            "dosageInstruction": [{"text": "1 tablet daily",
                "timing": {"repeat": {"frequency": 1, "period": 1, "periodUnit": "d"}},
                "doseAndRate": [{"doseQuantity": {"value": 1, "unit": "tablet"}}]}],
            "dispenseRequest": {
                "numberOfRepeatsAllowed": 0,
                "quantity": {"value": quantity, "unit": "tablet"},
                "expectedSupplyDuration": {"value": days, "unit": "days", "code": "d"}
            }
        }}
    ]})
}

/// Lisinopril 30 tablets for 30 days by `d` for `patient`.
pub fn lisinopril(patient: &str, d: Doctor) -> Value {
    bundle(
        patient,
        LISINOPRIL,
        "lisinopril 10 MG Oral Tablet",
        d,
        30.0,
        30,
    )
}

/// Oxycodone (schedule II) 20 tablets for 5 days by `d` for `patient`.
pub fn oxycodone(patient: &str, d: Doctor) -> Value {
    bundle(
        patient,
        OXYCODONE_5,
        "oxycodone hydrochloride 5 MG Oral Tablet",
        d,
        20.0,
        5,
    )
}

// ---------------------------------------------------------------------------------------------
// The server

/// A response: status, headers, body as JSON (Null if it is not JSON) and as text.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub json: Value,
    pub text: String,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts the body is a FHIR OperationOutcome served as application/fhir+json.
    pub fn assert_outcome(&self, status: u16) {
        assert_eq!(self.status, status, "{}", self.text);
        assert_eq!(
            self.header("content-type"),
            Some("application/fhir+json"),
            "{}",
            self.text
        );
        assert_eq!(
            self.json["resourceType"], "OperationOutcome",
            "{}",
            self.text
        );
        assert!(self.json["issue"][0]["code"].is_string(), "{}", self.text);
    }
}

pub struct TestServer {
    pub base: String,
    pub client: reqwest::Client,
    pub issuer: DevIssuer,
    pub svc: Arc<Services>,
    data_dir: std::path::PathBuf,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<Result<(), serve::ServeError>>>,
    _dir: tempfile::TempDir,
}

impl TestServer {
    /// Start `rxflow serve` on 127.0.0.1:0 over a fresh data directory.
    pub async fn start() -> TestServer {
        TestServer::start_with(Limits::default()).await
    }

    /// [`TestServer::start`] with other limits (a shorter request timeout, say).
    pub async fn start_with(limits: Limits) -> TestServer {
        capture_logs();
        let dir = tempfile::tempdir().expect("temp dir");
        let args = ServeArgs {
            addr: "127.0.0.1:0".parse().expect("addr"),
            data_dir: dir.path().join("data"),
        };
        let server = serve::bind_with(&args, limits).await.expect("server binds");
        let addr = server.local_addr();
        let svc = server.services();
        let issuer = DevIssuer::open_or_create(&rxflow::token::issuer_dir(&args.data_dir))
            .expect("dev issuer");
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(server.serve(async move {
            let _ = rx.await;
        }));
        TestServer {
            base: format!("http://{addr}"),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .expect("client"),
            issuer,
            svc,
            data_dir: args.data_dir.clone(),
            shutdown: Some(tx),
            handle: Some(handle),
            _dir: dir,
        }
    }

    /// Stop the server (graceful) and give back how it ended.
    pub async fn stop_result(&mut self) -> Result<(), serve::ServeError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match self.handle.take() {
            Some(h) => h.await.expect("server task"),
            None => Ok(()),
        }
    }

    /// The server's data directory.
    pub fn data_dir(&self) -> std::path::PathBuf {
        self.data_dir.clone()
    }

    /// Stop the server (graceful) and wait for it.
    pub async fn stop(mut self) {
        self.stop_here().await;
    }

    /// [`TestServer::stop`], keeping the handle to read what the server left behind.
    pub async fn stop_here(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            h.await.expect("server task").expect("server stops cleanly");
        }
    }

    pub fn token(&self, who: &Who) -> String {
        self.issuer
            .issue(
                &DevClaims {
                    subject: who.subject.clone(),
                    role: who.role,
                    tenant: who.tenant.clone(),
                    mfa: who.mfa,
                    npi: who.npi.clone(),
                },
                Duration::from_secs(600),
            )
            .expect("token")
    }

    /// Send a request; `body` is sent as application/fhir+json.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> Resp {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut req = self.client.request(method, format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req
                .header("content-type", "application/fhir+json")
                .body(serde_json::to_vec(b).expect("body"));
        }
        into_resp(req.send().await.expect("request sent")).await
    }

    /// Send a raw request (own headers and bytes).
    pub async fn raw(&self, req: reqwest::RequestBuilder) -> Resp {
        into_resp(req.send().await.expect("request sent")).await
    }

    pub async fn as_who(&self, who: &Who, method: &str, path: &str, body: Option<&Value>) -> Resp {
        let t = self.token(who);
        self.call(method, path, Some(&t), body).await
    }

    /// Submit `bundle` as `who`; the new prescription's id.
    pub async fn submit(&self, who: &Who, bundle: &Value) -> String {
        let r = self
            .as_who(who, "POST", "/prescriptions", Some(bundle))
            .await;
        assert_eq!(r.status, 201, "{}", r.text);
        let loc = r.header("location").expect("Location").to_string();
        loc.trim_start_matches("/prescriptions/").to_string()
    }

    /// The stored status of `rx_id` (read as a system step, audited).
    pub async fn status(&self, tenant: &str, rx_id: &str) -> Status {
        load_rx(&self.svc, &AuditCtx::system("test", tenant), tenant, rx_id)
            .await
            .expect("stored prescription")
            .status
    }

    /// Wait until the background pipeline has moved `rx_id` to `want`.
    pub async fn wait_for(&self, tenant: &str, rx_id: &str, want: Status) {
        for _ in 0..500 {
            if self.status(tenant, rx_id).await == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "{rx_id} never reached {want:?}; it is {:?}",
            self.status(tenant, rx_id).await
        );
    }

    /// Submit a lisinopril order by DR_PUMP for `patient` and wait for it in the queue.
    pub async fn queued(&self, patient: &str) -> String {
        let id = self
            .submit(
                &Who::prescriber("dr-pump", DR_PUMP),
                &lisinopril(patient, DR_PUMP),
            )
            .await;
        self.wait_for(TENANT, &id, Status::AwaitingVerification)
            .await;
        id
    }

    /// Approve `rx_id` as a pharmacist (rph-verifier, MFA) over HTTP.
    pub async fn verified(&self, rx_id: &str) {
        let r = self
            .as_who(
                &Who::pharmacist("rph-verifier"),
                "POST",
                &format!("/prescriptions/{rx_id}/verification"),
                Some(&json!({"decision": "approve"})),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
    }

    /// Audit events matching the query (read straight from the store).
    pub async fn audit(&self, q: AuditQuery) -> Vec<AuditEvent> {
        self.svc
            .vault
            .store
            .audit_search(&q)
            .await
            .expect("audit search")
            .iter()
            .map(|c| serde_json::from_slice(&c.body).expect("audit event decodes"))
            .collect()
    }

    /// The denials recorded against `subject`.
    pub async fn denials(&self, subject: &str) -> Vec<AuditEvent> {
        self.audit(AuditQuery {
            subject: Some(subject.to_string()),
            action: Some(Action::Deny),
            ..AuditQuery::default()
        })
        .await
    }

    /// The refused sign-ins recorded (`login` events).
    pub async fn logins(&self) -> Vec<AuditEvent> {
        self.audit(AuditQuery {
            action: Some(Action::Login),
            ..AuditQuery::default()
        })
        .await
    }

    /// Every audit event by `subject`.
    pub async fn events_of(&self, subject: &str) -> Vec<AuditEvent> {
        self.audit(AuditQuery {
            subject: Some(subject.to_string()),
            ..AuditQuery::default()
        })
        .await
    }
}

async fn into_resp(res: reqwest::Response) -> Resp {
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    let text = res.text().await.expect("response body");
    let json = serde_json::from_str(&text).unwrap_or(Value::Null);
    Resp {
        status,
        headers,
        json,
        text,
    }
}
