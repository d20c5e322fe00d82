//! Leaving discovery on shutdown: the control plane's Cloud Map API (`POST /`,
//! `X-Amz-Target: Route53AutoNaming_v20170314.<Action>`, `application/x-amz-json-1.1`, unsigned on
//! loopback). The service id is configured or looked up by namespace + service name.

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use serde_json::{Value, json};
use trellis_ca::cp_client::{ControlPlaneConnector, Transport};
use trellis_core::{NamespaceName, ServiceName};

const TARGET_PREFIX: &str = "Route53AutoNaming_v20170314.";
/// Largest API answer accepted.
const MAX_BODY: usize = 1024 * 1024;
/// Pages followed while looking for the service.
const MAX_PAGES: usize = 50;

/// Which instance to remove, where.
#[derive(Debug, Clone)]
pub struct Deregistration {
    pub control_plane: crate::config::HostPort,
    pub namespace: NamespaceName,
    pub service: ServiceName,
    pub service_id: Option<String>,
    pub instance_id: String,
    /// HTTP, or HTTPS verified against the mesh's roots.
    pub transport: Transport,
}

#[derive(Debug, thiserror::Error)]
pub enum DeregisterError {
    #[error("{action}: request failed: {detail}")]
    Http {
        action: &'static str,
        detail: String,
    },
    #[error("{action}: status {status}: {body}")]
    Status {
        action: &'static str,
        status: StatusCode,
        body: String,
    },
    #[error("{action}: bad answer: {detail}")]
    Decode {
        action: &'static str,
        detail: String,
    },
    #[error("namespace {0} not found in the control plane")]
    NoNamespace(String),
    #[error("service {0} not found in the control plane")]
    NoService(String),
}

type ApiClient = Client<ControlPlaneConnector, Full<Bytes>>;

impl Deregistration {
    /// `http(s)://<control plane>`.
    fn base(&self) -> String {
        self.transport.base_url(&self.control_plane)
    }

    /// Resolves the service id if needed and deregisters the instance. An instance already gone
    /// (`InstanceNotFound`) counts as done.
    pub async fn run(&self) -> Result<(), DeregisterError> {
        let client: ApiClient = self.transport.client();
        let service_id = match &self.service_id {
            Some(id) => id.clone(),
            None => self.lookup_service_id(&client).await?,
        };
        let body = json!({"ServiceId": service_id, "InstanceId": self.instance_id});
        match call(&client, &self.base(), "DeregisterInstance", &body).await {
            Ok(_) => Ok(()),
            Err(DeregisterError::Status { body, .. }) if body.contains("InstanceNotFound") => {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    async fn lookup_service_id(&self, client: &ApiClient) -> Result<String, DeregisterError> {
        let ns = self.namespace.as_str();
        let v = call(
            client,
            &self.base(),
            "ListNamespaces",
            &json!({"Filters": [{"Name": "NAME", "Values": [ns], "Condition": "EQ"}]}),
        )
        .await?;
        let ns_id = v["Namespaces"]
            .as_array()
            .and_then(|a| a.iter().find(|n| n["Name"].as_str() == Some(ns)))
            .and_then(|n| n["Id"].as_str())
            .ok_or_else(|| DeregisterError::NoNamespace(ns.to_owned()))?
            .to_owned();
        let mut token: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let mut req = json!({"Filters": [{"Name": "NAMESPACE_ID", "Values": [ns_id], "Condition": "EQ"}]});
            if let Some(t) = &token {
                req["NextToken"] = json!(t);
            }
            let v = call(client, &self.base(), "ListServices", &req).await?;
            let found = v["Services"].as_array().and_then(|a| {
                a.iter()
                    .find(|s| s["Name"].as_str() == Some(self.service.as_str()))
                    .and_then(|s| s["Id"].as_str())
            });
            if let Some(id) = found {
                return Ok(id.to_owned());
            }
            match v["NextToken"].as_str() {
                Some(t) => token = Some(t.to_owned()),
                None => break,
            }
        }
        Err(DeregisterError::NoService(self.service.to_string()))
    }
}

async fn call(
    client: &ApiClient,
    base: &str,
    action: &'static str,
    body: &Value,
) -> Result<Value, DeregisterError> {
    let req = Request::post(format!("{base}/"))
        .header("x-amz-target", format!("{TARGET_PREFIX}{action}"))
        .header("content-type", "application/x-amz-json-1.1")
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| DeregisterError::Http {
            action,
            detail: e.to_string(),
        })?;
    let resp = client
        .request(req)
        .await
        .map_err(|e| DeregisterError::Http {
            action,
            detail: trellis_ca::cp_client::error_chain(&e),
        })?;
    let status = resp.status();
    let bytes = http_body_util::Limited::new(resp.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| DeregisterError::Http {
            action,
            detail: e.to_string(),
        })?
        .to_bytes();
    if !status.is_success() {
        return Err(DeregisterError::Status {
            action,
            status,
            body: String::from_utf8_lossy(&bytes).into_owned(),
        });
    }
    serde_json::from_slice(&bytes).map_err(|e| DeregisterError::Decode {
        action,
        detail: e.to_string(),
    })
}
