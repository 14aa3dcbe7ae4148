//! The declarations and the reports, over zoned's agent socket: a
//! linearizable range of `zone/storage/ds/`, a watch from the revision after
//! it (any event: range again), and a report of the table every couple of
//! seconds and at every change of state.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result};
use hyper_util::rt::TokioIo;
use prost::Message as _;
use tonic::transport::{Channel, Endpoint, Uri};
use zone_datastores::DS_PREFIX;
use zone_proto::v1::{
    agent_client::AgentClient, kv_client::KvClient, Datastore, RangeRequest, WatchRequest,
};

use crate::effects::Mounts;
use crate::supervisor::{Supervisor, Table};

/// How often the table is reported when nothing changes (zoned counts a
/// report older than 10 s as none).
pub const REPORT_EVERY: Duration = Duration::from_secs(2);

/// A channel to zoned's agent socket, connected on first use.
pub fn channel(path: &Path) -> Channel {
    let path: PathBuf = path.to_owned();
    // The URI is not used: every connection goes to the unix socket.
    Endpoint::from_static("http://zoned.agent")
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(15))
        .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
}

/// Every declaration, read linearizably, and the revision read at.
pub async fn declarations(ch: Channel) -> Result<(Vec<Datastore>, u64)> {
    let r = KvClient::new(ch)
        .range(RangeRequest {
            prefix: DS_PREFIX.to_vec(),
            limit: 0,
            serializable: false,
            keys_only: false,
        })
        .await
        .context("reading the datastores")?
        .into_inner();
    let mut all = Vec::new();
    for kv in r.kvs {
        match Datastore::decode(kv.value.as_slice()) {
            Ok(mut d) => {
                d.revision = kv.mod_revision;
                all.push(d);
            }
            Err(e) => {
                tracing::error!(key = %String::from_utf8_lossy(&kv.key), error = %e, "a stored datastore cannot be decoded; skipped")
            }
        }
    }
    let revision = r.header.map_or(0, |h| h.revision);
    Ok((all, revision))
}

/// Follows the declarations until the connection fails; the supervisor
/// keeps its tasks across reconnections.
pub async fn follow<M: Mounts>(
    ch: Channel,
    sup: &mut Supervisor<M>,
    revision: &tokio::sync::watch::Sender<u64>,
) -> Result<()> {
    let (all, at) = declarations(ch.clone()).await?;
    sup.reconcile(&all);
    revision.send_replace(at);
    let mut stream = KvClient::new(ch.clone())
        .watch(WatchRequest {
            prefix: DS_PREFIX.to_vec(),
            start_revision: at + 1,
            prev_kv: false,
        })
        .await
        .context("watching the datastores")?
        .into_inner();
    loop {
        match stream.message().await.context("watching the datastores")? {
            Some(_) => {
                let (all, at) = declarations(ch.clone()).await?;
                sup.reconcile(&all);
                revision.send_replace(at);
            }
            None => anyhow::bail!("the watch ended"),
        }
    }
}

/// Reports the table to zoned every [`REPORT_EVERY`] and at every change,
/// forever; a failed report is logged once per streak and tried again.
pub async fn report(ch: Channel, table: Table, revision: tokio::sync::watch::Receiver<u64>) {
    let mut client = AgentClient::new(ch);
    let mut failing = false;
    loop {
        let r = table.report(*revision.borrow());
        match client.report_storage(r).await {
            Ok(_) => {
                if failing {
                    tracing::info!("reporting to zoned again");
                }
                failing = false;
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e.message(), "cannot report to zoned; retrying");
                }
                failing = true;
            }
        }
        let _ = tokio::time::timeout(REPORT_EVERY, table.changed.notified()).await;
    }
}
