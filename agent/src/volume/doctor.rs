//! doctor: the node's setup, checked.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::Code;

use super::types::Check;
use super::Agent;
use crate::broker::BrokerError;
use crate::config::BackendChoice;
use crate::mapping::{self};

impl Agent {
    /// The doctor's checks.
    pub async fn doctor(self: &Arc<Self>) -> Vec<Check> {
        let mut checks = Vec::new();
        // Without device-mapper the userspace backend serves: a failure only when the
        // agent is configured for dm-crypt alone.
        let dm = mapping::dm_available();
        checks.push(Check {
            name: "kernel dm-crypt".into(),
            ok: dm || self.cfg.backend != BackendChoice::DmCrypt,
            detail: match (dm, self.cfg.backend) {
                (true, _) => "device-mapper present".into(),
                (false, BackendChoice::DmCrypt) => "no device-mapper in this kernel, and backend = \"dm-crypt\" is configured: no volume can open (set backend = \"auto\" or \"userspace\")".into(),
                (false, _) => "no device-mapper in this kernel: volumes open through the userspace backend".into(),
            },
        });
        let xts = nodecrypt_xts::Backend::best();
        checks.push(Check {
            name: "cpu aes".into(),
            ok: true,
            detail: format!("userspace XTS backend: {}", xts.name()),
        });
        let broker = self
            .broker
            .describe("doctor-probe", Instant::now() + Duration::from_secs(5))
            .await;
        let (ok, detail) = match broker {
            Ok(_) => (true, "reachable".to_string()),
            Err(BrokerError::Refused { status, .. }) if status.code() != Code::Unauthenticated => (
                true,
                format!("reachable (mTLS ok; probe answered {:?})", status.code()),
            ),
            Err(e) => (false, e.to_string()),
        };
        checks.push(Check {
            name: format!("broker {}", self.broker.endpoint()),
            ok,
            detail,
        });
        checks.push(cert_check(&self.cfg.broker.cert));
        checks
    }
}

fn cert_check(path: &Path) -> Check {
    let (ok, detail) = match nodecrypt_common::tls::load_certs(path) {
        Ok(certs) if !certs.is_empty() => match x509_parser::parse_x509_certificate(&certs[0]) {
            Ok((_, cert)) => match cert.validity().time_to_expiration() {
                Some(left) => (
                    true,
                    format!(
                        "{} valid for {} more days",
                        path.display(),
                        left.whole_days()
                    ),
                ),
                None => (
                    false,
                    format!(
                        "{} is not valid now (valid {} to {})",
                        path.display(),
                        cert.validity().not_before,
                        cert.validity().not_after
                    ),
                ),
            },
            Err(e) => (false, format!("{}: {e}", path.display())),
        },
        Ok(_) => (false, format!("{}: no certificate", path.display())),
        Err(e) => (false, e.to_string()),
    };
    Check {
        name: "node certificate".into(),
        ok,
        detail,
    }
}
