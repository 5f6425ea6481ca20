//! The task that gets and renews certificates: for every host an `http` service claims
//! exactly (ahead of its first visitor), every host a visitor asked for that is claimed or
//! reserved (never for an arbitrary SNI), and every held certificate that is due. One
//! issuance at a time, each bounded in time; a host that fails backs off.

use std::sync::Arc;
use std::time::Duration;

use super::client::{Challenges, Client};
use super::fetch::Fetcher;
use super::jws::AccountKey;
use super::store::Certs;
use super::{AcmeError, AcmeSettings};
use crate::tls::state::{self, Secrecy};

/// How often claimed hosts and held certificates are looked over, besides when a visitor
/// asks for a host.
pub const SCAN: Duration = Duration::from_secs(2);
/// Longest time one issuance may take, all requests and polls included.
pub const ISSUE_LIMIT: Duration = Duration::from_secs(180);
/// The account key's file in the ACME state directory.
pub const ACCOUNT_KEY: &str = "account.key";

/// What the issuer asks of the relay (whether a host may have a certificate, which hosts
/// services claim now) and tells it (each issuance's outcome, to count).
pub trait Hosts: Send + Sync + 'static {
    /// Whether `host` is claimed exactly by an `http` service or reserved.
    fn eligible(&self, host: &str) -> bool;
    /// The hosts `http` services claim now.
    fn claimed(&self) -> Vec<String>;
    /// An issuance (or renewal) ended: `issued`, or failed.
    fn outcome(&self, issued: bool);
}

/// Runs for ever: issues and renews certificates into `certs`.
pub async fn run(
    settings: AcmeSettings,
    certs: Arc<Certs>,
    challenges: Arc<Challenges>,
    hosts: Arc<dyn Hosts>,
) {
    let mut client: Option<Client> = None;
    loop {
        let _ = tokio::time::timeout(SCAN, certs.kick.notified()).await;
        let mut todo = certs.take_wanted();
        todo.extend(hosts.claimed());
        todo.extend(certs.hosts());
        todo.sort();
        todo.dedup();
        for host in todo {
            if !hosts.eligible(&host) {
                certs.unwant(&host);
                continue;
            }
            if certs.fresh(&host) || certs.failing(&host) {
                continue;
            }
            let renewing = certs.get(&host).is_some();
            let attempt = issue(&settings, &mut client, &certs, &challenges, &host);
            let result = match tokio::time::timeout(ISSUE_LIMIT, attempt).await {
                Ok(r) => r,
                Err(_) => Err(AcmeError::Protocol(format!(
                    "not done within {ISSUE_LIMIT:?}"
                ))),
            };
            match result {
                Ok(not_after) => {
                    hosts.outcome(true);
                    let days = not_after
                        .duration_since(std::time::SystemTime::now())
                        .map_or(0, |d| d.as_secs() / 86_400);
                    let what = if renewing { "renewed" } else { "issued" };
                    tracing::info!(%host, "certificate {what}: valid for {days} more days");
                }
                Err(e) => {
                    hosts.outcome(false);
                    client = None; // start afresh next time: directory, account, nonce
                    let pause = certs.failed(&host);
                    tracing::warn!(%host, "certificate not issued: {e}; next try in {pause:?}");
                }
            }
            certs.ended();
        }
    }
}

/// One issuance for `host`, connecting to the CA first if needed.
async fn issue(
    settings: &AcmeSettings,
    client: &mut Option<Client>,
    certs: &Certs,
    challenges: &Challenges,
    host: &str,
) -> Result<std::time::SystemTime, AcmeError> {
    if client.is_none() {
        let fetch = Fetcher::new(settings.ca_file.as_deref())?;
        let key = account_key(settings)?;
        let email = settings.email.as_deref();
        *client = Some(Client::connect(fetch, &settings.directory, key, email).await?);
    }
    let Some(c) = client.as_mut() else {
        return Err(AcmeError::Protocol("no ACME client".into()));
    };
    let issued = c.issue(host, challenges, settings.challenge).await?;
    certs.install(host, &issued.chain_pem, &issued.key_pem)
}

/// The account key in the state directory, created (0600) the first time.
fn account_key(settings: &AcmeSettings) -> Result<AccountKey, AcmeError> {
    let path = settings.dir.join(ACCOUNT_KEY);
    if state::exists(&path)? {
        return AccountKey::from_pkcs8(&state::read(&path, Secrecy::Secret)?);
    }
    let (key, pkcs8) = AccountKey::generate()?;
    state::write_new(&path, &pkcs8, 0o600)?;
    Ok(key)
}
