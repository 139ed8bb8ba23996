//! `nodecrypt-keybroker status`: the seal, whether the HSM answers, the KEK's id, and the
//! wrapped keys per KEK id. Ids and counts only: no key material, sealed or not.
//!
//! The KEK is unsealed (into locked, zeroizing memory) to learn its id and dropped; the
//! store is only read (a read-only open), never written, so it can be run on a copy, or
//! on a broker that refuses to start, without changing a byte.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;

use super::{Seal, SealedKek, META_SEALED_KEK};
use crate::config::Config;
use crate::store::redb::{RedbBackend, STORE_FILE};
use crate::store::Backend;

/// The report.
#[derive(Debug, Serialize)]
pub struct Status {
    /// `file` or `pkcs11`.
    pub seal: &'static str,
    /// The KEK file, or the module, token and key labels.
    pub seal_detail: String,
    /// pkcs11: the module loads, the token is present, the PIN is accepted and the
    /// wrapping key is there and fit. `None` for the file seal.
    pub hsm_reachable: Option<bool>,
    /// Why the seal cannot be used, if it cannot.
    pub seal_error: Option<String>,
    /// The store.
    pub store: String,
    /// pkcs11: the store holds a sealed KEK.
    pub sealed_kek_in_store: Option<bool>,
    /// The id the store records for the KEK it was written with.
    pub store_kek_id: Option<String>,
    /// The id of the KEK the seal yields (unsealed to learn it).
    pub kek_id: Option<String>,
    /// The unsealed KEK is the store's (or the store records none yet).
    pub kek_matches_store: Option<bool>,
    /// Volume records (counted only when the KEK matches the store's).
    pub volumes: Option<u64>,
    /// Wrapped (active) key versions per KEK id.
    pub wrapped_keys_by_kek: BTreeMap<String, u64>,
    /// Why the store could not be read, if it could not.
    pub store_error: Option<String>,
    /// The broker would start with this configuration.
    pub ok: bool,
}

/// Builds the report for `cfg`.
pub async fn status(cfg: &Config) -> Status {
    let seal: Arc<dyn Seal> = super::from_config(&cfg.seal, &cfg.state_dir).into();
    let backend = RedbBackend::new(cfg.state_dir.join(STORE_FILE));
    let mut st = Status {
        seal: seal.kind(),
        seal_detail: seal.describe(),
        hsm_reachable: None,
        seal_error: None,
        store: backend.location(),
        sealed_kek_in_store: None,
        store_kek_id: None,
        kek_id: None,
        kek_matches_store: None,
        volumes: None,
        wrapped_keys_by_kek: BTreeMap::new(),
        store_error: None,
        ok: false,
    };
    let s = seal.clone();
    let probe = tokio::task::spawn_blocking(move || s.probe())
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
    if seal.in_store() {
        st.hsm_reachable = Some(probe.is_ok());
    }
    if let Err(e) = probe {
        st.seal_error = Some(e);
    }
    match backend.recorded_kek_id().await {
        Ok(id) => st.store_kek_id = id,
        Err(e) => st.store_error = Some(e.to_string()),
    }
    let sealed = if seal.in_store() {
        match backend.recorded_meta(META_SEALED_KEK).await {
            Ok(s) => {
                st.sealed_kek_in_store = Some(s.is_some());
                s.map(SealedKek::from_stored)
            }
            Err(e) => {
                st.store_error = Some(e.to_string());
                None
            }
        }
    } else {
        None
    };
    if st.seal_error.is_none() && (sealed.is_some() || !seal.in_store()) {
        let s = seal.clone();
        match tokio::task::spawn_blocking(move || s.unseal(sealed.as_ref())).await {
            Ok(Ok(kek)) => st.kek_id = Some(kek.id().to_string()),
            Ok(Err(e)) => st.seal_error = Some(e.to_string()),
            Err(e) => st.seal_error = Some(e.to_string()),
        }
    } else if st.seal_error.is_none() {
        st.seal_error = Some(format!(
            "the store {} holds no sealed KEK; run `nodecrypt-keybroker init --seal pkcs11`",
            st.store
        ));
    }
    if let Some(id) = &st.kek_id {
        st.kek_matches_store = Some(st.store_kek_id.as_ref().is_none_or(|r| r == id));
    }
    if st.kek_matches_store == Some(true) && st.store_error.is_none() {
        match count(&backend).await {
            Ok((n, by)) => {
                st.volumes = Some(n);
                st.wrapped_keys_by_kek = by;
            }
            Err(e) => st.store_error = Some(e),
        }
    }
    st.ok =
        st.seal_error.is_none() && st.store_error.is_none() && st.kek_matches_store == Some(true);
    st
}

async fn count(backend: &RedbBackend) -> Result<(u64, BTreeMap<String, u64>), String> {
    let records = backend.recorded_records().await.map_err(|e| {
        format!("{e} (a running broker holds the store open: stop it, or use `admin list`)")
    })?;
    let mut by = BTreeMap::new();
    for r in &records {
        for w in r.versions.iter().filter_map(|v| v.wrapped.as_ref()) {
            *by.entry(w.kek_id.clone()).or_insert(0) += 1;
        }
    }
    Ok((records.len() as u64, by))
}

impl Status {
    /// The human report, one fact a line.
    pub fn human(&self) -> String {
        let mut out = format!("seal: {} ({})\n", self.seal, self.seal_detail);
        if let Some(r) = self.hsm_reachable {
            out += &format!("hsm: {}\n", if r { "reachable" } else { "NOT reachable" });
        }
        if let Some(e) = &self.seal_error {
            out += &format!("seal error: {e}\n");
        }
        out += &format!("store: {}\n", self.store);
        if let Some(s) = self.sealed_kek_in_store {
            out += &format!("sealed KEK in store: {}\n", if s { "yes" } else { "no" });
        }
        let none = || "-".to_string();
        out += &format!(
            "KEK: {} (store records {}{})\n",
            self.kek_id.clone().unwrap_or_else(none),
            self.store_kek_id.clone().unwrap_or_else(none),
            match self.kek_matches_store {
                Some(true) => ": match",
                Some(false) => ": MISMATCH",
                None => "",
            }
        );
        if let Some(n) = self.volumes {
            out += &format!("volumes: {n}\n");
            for (k, n) in &self.wrapped_keys_by_kek {
                out += &format!("wrapped keys under {k}: {n}\n");
            }
        }
        if let Some(e) = &self.store_error {
            out += &format!("store error: {e}\n");
        }
        out += &format!("ok: {}\n", self.ok);
        out
    }
}
