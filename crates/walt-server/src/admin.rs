//! The `Admin` service: calls for `walt-server-setup` on the server itself.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use walt_proto::v1::admin_server::Admin;
use walt_proto::v1::{ReloadConfigReply, ReloadConfigRequest};

use crate::{State, registry_labels};

pub struct AdminService {
    state: Arc<State>,
}

impl AdminService {
    pub fn new(state: Arc<State>) -> Self {
        Self { state }
    }
}

/// Refuses callers that are not on this machine.
fn check_loopback<T>(req: &Request<T>) -> Result<(), Status> {
    match req.remote_addr() {
        Some(a) if a.ip().is_loopback() => Ok(()),
        Some(a) => Err(Status::permission_denied(format!(
            "administration calls are only accepted from this machine, not from {}",
            a.ip()
        ))),
        None => Err(Status::permission_denied(
            "administration calls are only accepted from this machine",
        )),
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn reload_config(
        &self,
        req: Request<ReloadConfigRequest>,
    ) -> Result<Response<ReloadConfigReply>, Status> {
        check_loopback(&req)?;
        let state = self.state.clone();
        let res = tokio::task::spawn_blocking(move || {
            let r = state.reload();
            (r, state.config())
        })
        .await
        .map_err(|e| Status::internal(format!("reload task failed: {e}")))?;
        let reply = match res {
            (Ok(new), _) => ReloadConfigReply {
                ok: true,
                message: format!("{} reloaded", self.state.config_path.display()),
                registries: registry_labels(&new),
            },
            (Err(reason), current) => ReloadConfigReply {
                ok: false,
                message: format!("{reason}; the previous configuration stays in force"),
                registries: registry_labels(&current),
            },
        };
        Ok(Response::new(reply))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::transport::server::TcpConnectInfo;

    fn from(peer: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        if let Some(p) = peer {
            r.extensions_mut().insert(TcpConnectInfo {
                local_addr: None,
                remote_addr: Some(p.parse().unwrap()),
            });
        }
        r
    }

    #[test]
    fn only_loopback_peers() {
        assert!(check_loopback(&from(Some("127.0.0.1:4000"))).is_ok());
        assert!(check_loopback(&from(Some("[::1]:4000"))).is_ok());
        let e = check_loopback(&from(Some("192.168.1.2:4000"))).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().contains("192.168.1.2"), "{}", e.message());
        assert!(check_loopback(&from(None)).is_err());
    }
}
