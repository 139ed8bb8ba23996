//! The scale-out [`KeyStore`]: volume records in an etcd cluster (v3 API), shared by
//! several stateless broker replicas.
//!
//! Layout under a configurable prefix `P` (default `/nodecrypt`):
//! - `P/volumes/<volume_id>`: the record, the same JSON document redb stores;
//! - `P/meta/<key>`: store metadata (the KEK id, [`META_KEK_ID`]).
//!
//! A record's [`Revision`] is its etcd `mod_revision`. A put is one transaction comparing
//! it (`create_revision == 0` for a record that must not exist yet), so concurrent
//! creates of one volume on any number of replicas produce exactly one record, and a
//! write based on a stale read is refused with [`StoreError::Conflict`].
//!
//! **No read cache.** Every get is a linearizable range read (etcd's default), answered
//! only once the serving member has confirmed with a quorum that it is current: another
//! replica's destroy, once acknowledged, is seen by the very next get here. A cache
//! would need a watch and still serve stale records while the watch lags, which is what
//! "no replica serves a key after its destroy was acknowledged" forbids.
//!
//! **Failures are answers, never guesses.** Every call runs under the configured timeout
//! and asks for a leader (`require_leader`): etcd unreachable, a member without a leader,
//! a cluster without quorum all become [`StoreError::Backend`] naming the endpoints and
//! the cause, which the service maps to `UNAVAILABLE`. A put that timed out may or may
//! not have committed; the caller sees `UNAVAILABLE` and retries, and every flow above
//! the store is idempotent.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Certificate, Client, CompactionOptions, Compare, CompareOp, ConnectOptions, GetOptions,
    Identity, KvClient, TlsOptions, Txn, TxnOp, TxnOpResponse,
};

use super::{Backend, KeyStore, Revision, StoreError, VolumeRecord, META_KEK_ID};
use crate::tls::TlsFiles;

/// Records per page of a listing: a range read of this many keys at a time, so a store
/// of 10⁵ volumes is never one huge response (etcd caps a request at 1.5 MiB by default).
pub const LIST_PAGE: i64 = 500;

/// A listing restarts this many times at most when a compaction overtakes it.
const LIST_RESTARTS: usize = 3;

/// Where the etcd cluster is and how to reach it.
#[derive(Clone, Debug)]
pub struct EtcdSettings {
    /// Client URLs, `https://host:port` each.
    pub endpoints: Vec<String>,
    /// Key prefix of this broker's records (no trailing `/`), e.g. `/nodecrypt`.
    pub prefix: String,
    /// The broker's client certificate and key, and the CA etcd's certificates chain to.
    pub tls: TlsFiles,
    /// Deadline of every call (connect included).
    pub timeout: Duration,
}

/// Key layout under a prefix.
#[derive(Clone, Debug)]
struct Layout {
    prefix: String,
}

impl Layout {
    fn volume(&self, volume_id: &str) -> Vec<u8> {
        format!("{}/volumes/{volume_id}", self.prefix).into_bytes()
    }

    fn volumes(&self) -> Vec<u8> {
        format!("{}/volumes/", self.prefix).into_bytes()
    }

    fn meta(&self, key: &str) -> Vec<u8> {
        format!("{}/meta/{key}", self.prefix).into_bytes()
    }
}

/// The first key after every key that starts with `prefix` (etcd's range end).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0] // every key: only for a prefix of 0xff bytes, which ours never is
}

/// The smallest key after `key`.
fn key_after(key: &[u8]) -> Vec<u8> {
    let mut next = key.to_vec();
    next.push(0);
    next
}

/// An etcd cluster before the broker uses it: connected (lazily: the first call dials),
/// not yet written to.
pub struct EtcdBackend {
    store: Arc<EtcdStore>,
}

impl EtcdBackend {
    /// A client for `settings` (reads its TLS files; dials on the first call).
    pub async fn connect(settings: EtcdSettings) -> Result<Self, StoreError> {
        Ok(Self {
            store: Arc::new(EtcdStore::connect(settings).await?),
        })
    }
}

#[async_trait::async_trait]
impl Backend for EtcdBackend {
    fn location(&self) -> String {
        self.store.location()
    }

    async fn recorded_kek_id(&self) -> Result<Option<String>, StoreError> {
        self.store.meta_get(META_KEK_ID).await
    }

    /// A plain read: etcd metadata is read without writing (e.g. the sealed KEK).
    async fn recorded_meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.store.meta_get(key).await
    }

    async fn open(&self) -> Result<Arc<dyn KeyStore>, StoreError> {
        Ok(self.store.clone())
    }
}

/// etcd-backed store; cheap to share (one client, one HTTP/2 connection per member).
pub struct EtcdStore {
    client: Client,
    layout: Layout,
    endpoints: String,
    timeout: Duration,
}

fn read_pem(path: &std::path::Path) -> Result<Vec<u8>, StoreError> {
    std::fs::read(path).map_err(|e| {
        StoreError::Backend(format!(
            "etcd TLS file {}: {e}; check the [store] section of the broker config",
            path.display()
        ))
    })
}

impl EtcdStore {
    /// A store over the cluster of `settings` (reads its TLS files; dials lazily).
    pub async fn connect(settings: EtcdSettings) -> Result<Self, StoreError> {
        let endpoints = settings.endpoints.join(",");
        let tls = TlsOptions::new()
            .ca_certificate(Certificate::from_pem(read_pem(&settings.tls.ca)?))
            .identity(Identity::from_pem(
                read_pem(&settings.tls.cert)?,
                read_pem(&settings.tls.key)?,
            ));
        let options = ConnectOptions::new()
            .with_tls(tls)
            .with_timeout(settings.timeout)
            .with_connect_timeout(settings.timeout)
            // A dead member's connection is noticed within a few seconds even when the
            // kernel sends no reset (a partition), and the balancer moves on.
            .with_keep_alive(Duration::from_secs(2), settings.timeout)
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        let client = Client::connect(&settings.endpoints, Some(options))
            .await
            .map_err(|e| StoreError::Backend(format!("etcd ({endpoints}): {e}")))?;
        Ok(Self {
            client,
            layout: Layout {
                prefix: settings.prefix,
            },
            endpoints,
            timeout: settings.timeout,
        })
    }

    /// The endpoints and prefix, for messages.
    pub fn location(&self) -> String {
        format!("etcd {} (prefix {})", self.endpoints, self.layout.prefix)
    }

    fn kv(&self) -> KvClient {
        self.client.kv_client()
    }

    /// Runs one etcd call under the store's deadline; every failure names the cluster.
    async fn call<T>(
        &self,
        what: &str,
        fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) if is_deadline(&e) => Err(self.no_answer(what)),
            Ok(Err(e)) => Err(StoreError::Backend(format!(
                "etcd ({}) {what}: {}",
                self.endpoints,
                describe(&e)
            ))),
            Err(_) => Err(self.no_answer(what)),
        }
    }

    fn no_answer(&self, what: &str) -> StoreError {
        StoreError::Backend(format!(
            "etcd ({}) {what}: no answer within {} ms (the cluster has no quorum, or no \
             member is reachable)",
            self.endpoints,
            self.timeout.as_millis()
        ))
    }

    /// One page of records: keys in `[from, end)` at `revision` (0: the current one).
    /// Returns the records, the revision read at, and the key to continue from.
    async fn page(
        &self,
        from: Vec<u8>,
        end: &[u8],
        revision: i64,
    ) -> Result<(Vec<VolumeRecord>, i64, Option<Vec<u8>>), StoreError> {
        let mut opts = GetOptions::new()
            .with_range(end.to_vec())
            .with_limit(LIST_PAGE);
        if revision > 0 {
            opts = opts.with_revision(revision);
        }
        let resp = self.call("list", self.kv().get(from, Some(opts))).await?;
        let at = resp.header().map_or(revision, |h| h.revision());
        let at = if revision > 0 { revision } else { at };
        let mut out = Vec::with_capacity(resp.kvs().len());
        for kv in resp.kvs() {
            let id = String::from_utf8_lossy(kv.key()).into_owned();
            out.push(decode(&id, kv.value())?);
        }
        let next = match resp.kvs().last() {
            Some(last) if resp.more() => Some(key_after(last.key())),
            _ => None,
        };
        Ok((out, at, next))
    }
}

/// An etcd error in words, with the gRPC status message when there is one
/// ("etcdserver: no leader", "etcdserver: request timed out").
fn describe(e: &etcd_client::Error) -> String {
    match e {
        etcd_client::Error::GRpcStatus(s) => format!("{:?}: {}", s.code(), s.message()),
        e => e.to_string(),
    }
}

/// The client's own per-request deadline (tonic cancels the call: "Timeout expired").
fn is_deadline(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s)
        if s.code() == tonic::Code::Cancelled && s.message().contains("Timeout expired"))
}

fn is_compacted(e: &StoreError) -> bool {
    matches!(e, StoreError::Backend(m) if m.contains("required revision has been compacted"))
}

fn decode(volume_id: &str, bytes: &[u8]) -> Result<VolumeRecord, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        volume_id: volume_id.to_string(),
        what: e.to_string(),
    })
}

fn revision(volume_id: &str, r: i64) -> Result<Revision, StoreError> {
    u64::try_from(r).map_err(|_| StoreError::Corrupt {
        volume_id: volume_id.to_string(),
        what: format!("etcd revision {r} is negative"),
    })
}

#[async_trait::async_trait]
impl KeyStore for EtcdStore {
    async fn get(
        &self,
        volume_id: &str,
    ) -> Result<Option<(Revision, Arc<VolumeRecord>)>, StoreError> {
        // Linearizable (not serializable): a destroy acknowledged anywhere is seen here.
        let resp = self
            .call("get", self.kv().get(self.layout.volume(volume_id), None))
            .await?;
        match resp.kvs().first() {
            None => Ok(None),
            Some(kv) => Ok(Some((
                revision(volume_id, kv.mod_revision())?,
                Arc::new(decode(volume_id, kv.value())?),
            ))),
        }
    }

    async fn put(
        &self,
        record: &VolumeRecord,
        expected: Option<Revision>,
    ) -> Result<Revision, StoreError> {
        let id = &record.volume_id;
        let key = self.layout.volume(id);
        let bytes = serde_json::to_vec(record).map_err(|e| StoreError::Backend(e.to_string()))?;
        let guard = match expected {
            None => Compare::create_revision(key.clone(), CompareOp::Equal, 0),
            Some(rev) => {
                let rev = i64::try_from(rev).map_err(|_| StoreError::Conflict(id.clone()))?;
                Compare::mod_revision(key.clone(), CompareOp::Equal, rev)
            }
        };
        let txn = Txn::new()
            .when([guard])
            .and_then([TxnOp::put(key, bytes, None)]);
        let resp = self.call("put", self.kv().txn(txn)).await?;
        if !resp.succeeded() {
            return Err(StoreError::Conflict(id.clone()));
        }
        // The put's mod_revision is the transaction's revision.
        let rev = resp
            .header()
            .map(|h| h.revision())
            .ok_or_else(|| StoreError::Backend("etcd put: answer without a header".into()))?;
        revision(id, rev)
    }

    async fn list(&self) -> Result<Vec<VolumeRecord>, StoreError> {
        let start = self.layout.volumes();
        let end = prefix_end(&start);
        let mut restarts = 0;
        'listing: loop {
            // Every page after the first reads at the first page's revision: the listing
            // is one snapshot, however many pages it takes.
            let mut out = Vec::new();
            let mut from = start.clone();
            let mut at = 0;
            loop {
                match self.page(from, &end, at).await {
                    Ok((records, rev, next)) => {
                        out.extend(records);
                        at = rev;
                        match next {
                            Some(n) => from = n,
                            None => return Ok(out),
                        }
                    }
                    // A scrub compacted the snapshot away: start again from the present.
                    Err(e) if is_compacted(&e) && restarts < LIST_RESTARTS => {
                        restarts += 1;
                        continue 'listing;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
    }

    async fn meta_get(&self, key: &str) -> Result<Option<String>, StoreError> {
        let resp = self
            .call("meta get", self.kv().get(self.layout.meta(key), None))
            .await?;
        resp.kvs()
            .first()
            .map(|kv| {
                String::from_utf8(kv.value().to_vec()).map_err(|_| StoreError::Corrupt {
                    volume_id: format!("(metadata {key})"),
                    what: "not UTF-8".into(),
                })
            })
            .transpose()
    }

    /// Sets a metadata value. The KEK id is recorded once and never replaced here: two
    /// replicas starting at once with different KEKs on an empty cluster cannot both
    /// record theirs (the second is refused and does not start).
    async fn meta_put(&self, key: &str, value: &str) -> Result<(), StoreError> {
        let k = self.layout.meta(key);
        if key != META_KEK_ID {
            self.call("meta put", self.kv().put(k, value, None)).await?;
            return Ok(());
        }
        let txn = Txn::new()
            .when([Compare::create_revision(k.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(k.clone(), value, None)])
            .or_else([TxnOp::get(k, None)]);
        let resp = self.call("meta put", self.kv().txn(txn)).await?;
        if resp.succeeded() {
            return Ok(());
        }
        let recorded = resp.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(g) => g
                .kvs()
                .first()
                .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
            _ => None,
        });
        match recorded {
            Some(r) if r == value => Ok(()),
            Some(r) => Err(StoreError::Backend(format!(
                "{} already records KEK id {r}, not {value}: every replica must load the same KEK",
                self.location()
            ))),
            None => Err(StoreError::Conflict(format!("(metadata {key})"))),
        }
    }

    /// Compacts etcd's history up to now: the previous versions of every record (the
    /// wrapped keys a retire or destroy just wiped) are no longer readable at any
    /// revision. The bytes leave the members' files at their next defragmentation.
    async fn scrub(&self) -> Result<(), StoreError> {
        let now = self
            .call(
                "scrub",
                self.kv().get(
                    self.layout.meta(META_KEK_ID),
                    Some(GetOptions::new().with_keys_only()),
                ),
            )
            .await?
            .header()
            .map_or(0, |h| h.revision());
        if now <= 0 {
            return Ok(());
        }
        match self
            .call(
                "scrub",
                self.kv().compact(now, Some(CompactionOptions::new())),
            )
            .await
        {
            // Another replica compacted as far or further meanwhile.
            Err(e) if is_compacted(&e) => Ok(()),
            r => r.map(|_| ()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_live_under_the_prefix_and_ranges_end_after_it() {
        let l = Layout {
            prefix: "/nodecrypt".into(),
        };
        assert_eq!(l.volume("vol-1"), b"/nodecrypt/volumes/vol-1");
        assert_eq!(l.meta(META_KEK_ID), b"/nodecrypt/meta/kek_id");
        let (start, end) = (l.volumes(), prefix_end(&l.volumes()));
        assert_eq!(end, b"/nodecrypt/volumes0");
        for inside in [l.volume("a"), l.volume("zzzz"), l.volume("\u{7f}")] {
            assert!(start <= inside && inside < end);
        }
        assert!(l.meta("kek_id") < start || l.meta("kek_id") >= end);
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(key_after(b"k"), b"k\0");
    }
}
