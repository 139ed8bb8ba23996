//! Finding the node's nodecrypt volumes: every candidate device is read (never written)
//! and judged from its bytes alone, each on its own thread under one deadline, so a disk
//! that hangs on read holds up no other.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use crate::device::{self, Device};
use crate::luks::{self, Header, Inspection, Refusal, Stage};

/// How long discovery waits for one device's header read.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// A usable nodecrypt volume on a device.
#[derive(Debug, Clone)]
pub struct Found {
    /// The device.
    pub device: Device,
    /// Its judged header.
    pub header: Header,
}

impl Found {
    /// The volume id (from the judged token).
    pub fn volume_id(&self) -> &str {
        self.header.token().map_or("", |t| t.volume_id.as_str())
    }
}

/// What discovery learnt of one device that looks like nodecrypt's.
#[derive(Debug)]
pub enum Probe {
    /// A usable volume.
    Ours(Found),
    /// A nodecrypt-looking header that is not used as it is.
    Refused {
        /// The device.
        device: Device,
        /// The volume id it claims (untrusted), if any.
        claimed_volume_id: Option<String>,
        /// Why it is refused.
        refusal: Refusal,
    },
    /// The device did not answer a header read within [`PROBE_TIMEOUT`].
    Stuck {
        /// The device path.
        path: PathBuf,
    },
}

impl Probe {
    /// The device path.
    pub fn path(&self) -> &Path {
        match self {
            Probe::Ours(f) => &f.device.path,
            Probe::Refused { device, .. } => &device.path,
            Probe::Stuck { path } => path,
        }
    }
}

/// Reads and judges one candidate; `None` when it is not nodecrypt's (or not there).
fn probe(path: &Path, allow_files: bool) -> Option<Probe> {
    let dev = device::validate(path.to_str()?, allow_files).ok()?;
    match luks::inspect(&dev.path, dev.size, Stage::Usable) {
        Ok(Inspection::Ours(header)) => Some(Probe::Ours(Found {
            device: dev,
            header,
        })),
        Ok(Inspection::Refused {
            claimed_volume_id,
            refusal,
        }) => Some(Probe::Refused {
            device: dev,
            claimed_volume_id,
            refusal,
        }),
        Ok(Inspection::NotLuks | Inspection::Foreign { .. }) => None,
        Err(e) => {
            debug!(device = %dev.path.display(), error = %e, "unreadable device skipped");
            None
        }
    }
}

/// Probes every candidate in parallel (one thread each) and returns what looks like
/// nodecrypt's, in the candidates' order. A device still reading after `timeout` is
/// reported [`Probe::Stuck`]; its thread is left to finish on its own.
pub fn discover(candidates: Vec<PathBuf>, allow_files: bool, timeout: Duration) -> Vec<Probe> {
    let (tx, rx) = mpsc::channel();
    let mut waiting: Vec<Option<PathBuf>> = Vec::with_capacity(candidates.len());
    for (i, path) in candidates.into_iter().enumerate() {
        let (t, p) = (tx.clone(), path.clone());
        let spawned = std::thread::Builder::new()
            .name("nodecrypt-probe".into())
            .spawn(move || {
                let _ = t.send((i, probe(&p, allow_files)));
            });
        match spawned {
            Ok(_) => waiting.push(Some(path)),
            Err(e) => {
                // No thread to spare: probe it here instead.
                warn!(error = %e, "probe thread not started; probing inline");
                let _ = tx.send((i, probe(&path, allow_files)));
                waiting.push(Some(path));
            }
        }
    }
    drop(tx);
    let deadline = Instant::now() + timeout;
    let mut results: Vec<Option<Probe>> = (0..waiting.len()).map(|_| None).collect();
    let mut left = waiting.len();
    while left > 0 {
        let now = Instant::now();
        let Ok((i, r)) = rx.recv_timeout(deadline.saturating_duration_since(now)) else {
            break;
        };
        waiting[i] = None;
        results[i] = r;
        left -= 1;
    }
    for (i, path) in waiting.into_iter().enumerate() {
        if let Some(path) = path {
            warn!(device = %path.display(), timeout = ?timeout, "device did not answer a header read");
            results[i] = Some(Probe::Stuck { path });
        }
    }
    results.into_iter().flatten().collect()
}
