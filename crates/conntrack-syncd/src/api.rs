//! The gRPC face of conntrack-syncd: the engine's snapshot for Status, and
//! requests handed to the engine's task.

use std::sync::Arc;

use conntrack_syncd::engine::{Command, Snapshot};
use tandem_proto::v1::{self, SyncRole, conntrack_sync_server::ConntrackSync};
use tandem_runtime::ConfigCell;
use tokio::sync::{mpsc, oneshot, watch};
use tonic::{Request, Response, Status};

pub struct ConntrackSyncApi {
    pub config: Arc<ConfigCell>,
    pub snapshot: watch::Receiver<Snapshot>,
    pub commands: mpsc::Sender<Command>,
}

impl ConntrackSyncApi {
    fn status(&self) -> v1::ConntrackSyncStatus {
        let mut s = self.snapshot.borrow().status.clone();
        s.daemon = Some(self.config.daemon_info());
        s
    }

    /// Hands a request to the engine and waits for its answer.
    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, Status> {
        let (tx, rx) = oneshot::channel();
        let not_running = || {
            let why = self.snapshot.borrow().status.last_error.clone();
            Status::failed_precondition(format!("conntrack replication is not running: {why}"))
        };
        self.commands
            .send(make(tx))
            .await
            .map_err(|_| not_running())?;
        rx.await.map_err(|_| not_running())
    }
}

#[tonic::async_trait]
impl ConntrackSync for ConntrackSyncApi {
    async fn status(
        &self,
        _: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::ConntrackSyncStatus>, Status> {
        Ok(Response::new(self.status()))
    }

    async fn reload(
        &self,
        _: Request<v1::ReloadRequest>,
    ) -> Result<Response<v1::ReloadReply>, Status> {
        Ok(Response::new(self.config.reload().into()))
    }

    async fn set_role(
        &self,
        req: Request<v1::SetSyncRoleRequest>,
    ) -> Result<Response<v1::ConntrackSyncStatus>, Status> {
        let role = req.into_inner().role();
        self.ask(|tx| Command::SetRole(role, tx)).await?;
        let mut snapshot = self.snapshot.clone();
        // The engine applies the role on its next turn.
        let _ = tokio::time::timeout(
            std::time::Duration::from_millis(200),
            snapshot.wait_for(|s| role == SyncRole::Unspecified || s.status.role() == role),
        )
        .await;
        Ok(Response::new(self.status()))
    }

    async fn resync(
        &self,
        _: Request<v1::ResyncRequest>,
    ) -> Result<Response<v1::ConntrackSyncStatus>, Status> {
        self.ask(Command::Resync).await?;
        Ok(Response::new(self.status()))
    }

    async fn commit(
        &self,
        _: Request<v1::CommitRequest>,
    ) -> Result<Response<v1::CommitReply>, Status> {
        let (n, took) = self.ask(Command::Commit).await?;
        Ok(Response::new(v1::CommitReply {
            entries_committed: n,
            duration_us: u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
        }))
    }

    async fn flush(
        &self,
        _: Request<v1::FlushRequest>,
    ) -> Result<Response<v1::ConntrackSyncStatus>, Status> {
        self.ask(Command::Flush).await?;
        Ok(Response::new(self.status()))
    }
}
