//! The floor under a replicated write served over gRPC: the bare
//! replicated write of [`crate::machine`], but with each hop a tonic unary
//! call and each fsync on a disk thread of its own, as a Raft server does
//! it. No log, no consensus, no state machine: what is left between this
//! figure and a real server's one-client put is the replication protocol
//! and the store.

use std::path::Path;
use std::pin::Pin;
use std::sync::mpsc as std_mpsc;
use std::time::Instant;

use anyhow::{Context, Result};
use tokio::sync::oneshot;
use tokio_stream::Stream;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use zone_proto::v1::kv_client::KvClient;
use zone_proto::v1::kv_server::{Kv, KvServer};
use zone_proto::v1::{
    DeleteRequest, DeleteResponse, GetRequest, GetResponse, PutRequest, PutResponse, RangeRequest,
    RangeResponse, TxnRequest, TxnResponse, WatchRequest, WatchResponse,
};

use crate::load::quantile_ms;

/// Appends each record it is handed to its file with fdatasync, one at a
/// time, on its own thread, and answers when the record is durable.
#[derive(Clone)]
struct Disk(std_mpsc::Sender<(Vec<u8>, oneshot::Sender<std::io::Result<()>>)>);

impl Disk {
    fn start(path: &Path) -> Result<Disk> {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(path)
            .with_context(|| format!("creating {}", path.display()))?;
        let (tx, rx) = std_mpsc::channel::<(Vec<u8>, oneshot::Sender<std::io::Result<()>>)>();
        std::thread::Builder::new()
            .name("floor-disk".into())
            .spawn(move || {
                for (record, done) in rx {
                    let r = file.write_all(&record).and_then(|()| file.sync_data());
                    let _ = done.send(r);
                }
            })
            .context("starting a disk thread")?;
        Ok(Disk(tx))
    }

    async fn append(&self, record: Vec<u8>) -> Result<(), Status> {
        let (tx, rx) = oneshot::channel();
        self.0
            .send((record, tx))
            .map_err(|_| Status::internal("disk thread stopped"))?;
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Status::internal(format!("append: {e}"))),
            Err(_) => Err(Status::internal("disk thread stopped")),
        }
    }
}

/// A leader (with a follower to pass each put on to) or a follower.
struct Replica {
    disk: Disk,
    follower: Option<KvClient<Channel>>,
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchResponse, Status>> + Send>>;

fn not_here<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented(
        "the gRPC floor probe only takes puts",
    ))
}

#[tonic::async_trait]
impl Kv for Replica {
    async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let req = req.into_inner();
        let mut record = req.key.clone();
        record.extend_from_slice(&req.value);
        match &self.follower {
            None => self.disk.append(record).await?,
            Some(follower) => {
                let mut follower = follower.clone();
                let (local, remote) = tokio::join!(self.disk.append(record), follower.put(req));
                local?;
                remote?;
            }
        }
        Ok(Response::new(PutResponse::default()))
    }

    async fn get(&self, _: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        not_here()
    }

    async fn range(&self, _: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
        not_here()
    }

    async fn delete(&self, _: Request<DeleteRequest>) -> Result<Response<DeleteResponse>, Status> {
        not_here()
    }

    async fn txn(&self, _: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        not_here()
    }

    type WatchStream = WatchStream;

    async fn watch(&self, _: Request<WatchRequest>) -> Result<Response<WatchStream>, Status> {
        not_here()
    }

    async fn compact(
        &self,
        _: Request<zone_proto::v1::CompactRequest>,
    ) -> Result<Response<zone_proto::v1::CompactResponse>, Status> {
        not_here()
    }
}

/// Serves `replica` on a loopback port of its own, on `runtime` (whose
/// reactor then owns the listener and its connections), and returns the
/// address.
fn serve(runtime: &tokio::runtime::Runtime, replica: Replica) -> Result<String> {
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    std_listener.set_nonblocking(true)?;
    let addr = std_listener.local_addr()?.to_string();
    let _in_runtime = runtime.enter();
    let listener = tokio::net::TcpListener::from_std(std_listener)?;
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    runtime.spawn(
        tonic::transport::Server::builder()
            .add_service(KvServer::new(replica))
            .serve_with_incoming(incoming),
    );
    Ok(addr)
}

async fn client(addr: &str) -> Result<KvClient<Channel>> {
    let channel = crate::cluster::plain_channel(addr)
        .await
        .with_context(|| format!("connecting to the probe at {addr}"))?;
    Ok(KvClient::new(channel))
}

/// p50 of `n` sequential puts (16-byte key, 256-byte value) from one client
/// through a leader to one follower, each hop a tonic unary call over
/// loopback, each server appending the record with fdatasync on its disk
/// thread, the leader's fsync in parallel with the follower's hop. Each
/// server has its own runtime (two workers), as separate processes would.
/// Files in `dir` (the data disk).
pub async fn grpc_replicated_write_p50_ms(dir: &Path, n: usize) -> Result<f64> {
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("starting a runtime for the gRPC floor probe")
    };
    let (follower_rt, leader_rt) = (runtime()?, runtime()?);
    let (follower_file, leader_file) = (dir.join("floor-follower"), dir.join("floor-leader"));
    let result = async {
        let follower_addr = serve(
            &follower_rt,
            Replica {
                disk: Disk::start(&follower_file)?,
                follower: None,
            },
        )?;
        // The leader's client to its follower is made on the leader's
        // runtime, so its connection task runs there.
        let to_follower = leader_rt
            .spawn(async move { client(&follower_addr).await })
            .await??;
        let leader_addr = serve(
            &leader_rt,
            Replica {
                disk: Disk::start(&leader_file)?,
                follower: Some(to_follower),
            },
        )?;
        let mut kv = client(&leader_addr).await?;
        let mut lat = Vec::with_capacity(n);
        for i in 0..n {
            let req = PutRequest {
                key: format!("floor-{i:010}").into_bytes(),
                value: vec![b'v'; 256],
                ..Default::default()
            };
            let t0 = Instant::now();
            kv.put(req)
                .await
                .context("a put through the gRPC floor probe")?;
            lat.push(t0.elapsed().as_micros().max(1) as u32);
        }
        lat.sort_unstable();
        Ok(quantile_ms(&lat, 0.5))
    }
    .await;
    // Dropping a runtime blocks, which an async context must not do; the
    // servers' tasks and disk threads end with them.
    follower_rt.shutdown_background();
    leader_rt.shutdown_background();
    for f in [follower_file, leader_file] {
        let _ = std::fs::remove_file(f);
    }
    result
}
