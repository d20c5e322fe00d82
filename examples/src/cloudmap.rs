//! A minimal Cloud Map client over the real wire protocol (AWS JSON 1.1), as the demo registers
//! everything the way a user's tooling would: the same requests `aws servicediscovery` sends.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use serde_json::{Value, json};
use trellis_ca::cp_client::{ControlPlaneConnector, Transport};

const TARGET_PREFIX: &str = "Route53AutoNaming_v20170314.";

/// Why a Cloud Map call failed: transport, or the API's own error (`__type` + message).
#[derive(Debug, thiserror::Error)]
pub enum CloudMapError {
    #[error("cannot reach the Cloud Map API: {0}")]
    Transport(String),
    #[error("{action}: {kind}: {message}")]
    Api {
        action: String,
        kind: String,
        message: String,
    },
    #[error("{action}: operation {operation} ended {status}")]
    Operation {
        action: String,
        operation: String,
        status: String,
    },
}

pub struct CloudMap {
    base: String,
    client: Client<ControlPlaneConnector, Full<Bytes>>,
}

impl CloudMap {
    /// A control plane serving plain HTTP.
    pub fn new(api: SocketAddr) -> Self {
        Self::with_transport(api, &Transport::plain())
    }

    /// A control plane reached over `transport` (HTTPS with `--api-tls`).
    pub fn with_transport(api: SocketAddr, transport: &Transport) -> Self {
        CloudMap {
            base: transport.base_url(api),
            client: transport.client(),
        }
    }

    /// One action; returns the JSON answer.
    pub async fn call(&self, action: &str, body: Value) -> Result<Value, CloudMapError> {
        let req = http::Request::post(format!("{}/", self.base))
            .header("content-type", "application/x-amz-json-1.1")
            .header("x-amz-target", format!("{TARGET_PREFIX}{action}"))
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| CloudMapError::Transport(e.to_string()))?;
        let resp = self
            .client
            .request(req)
            .await
            .map_err(|e| CloudMapError::Transport(trellis_ca::cp_client::error_chain(&e)))?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| CloudMapError::Transport(e.to_string()))?
            .to_bytes();
        let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if status.is_success() {
            Ok(value)
        } else {
            Err(CloudMapError::Api {
                action: action.to_owned(),
                kind: value["__type"].as_str().unwrap_or("unknown").to_owned(),
                message: value["Message"]
                    .as_str()
                    .or(value["message"].as_str())
                    .unwrap_or("")
                    .to_owned(),
            })
        }
    }

    /// Waits for an asynchronous operation (namespace creation, registration) to succeed; returns
    /// the operation's description.
    pub async fn wait_operation(&self, action: &str, id: &str) -> Result<Value, CloudMapError> {
        for _ in 0..200 {
            let op = self
                .call("GetOperation", json!({ "OperationId": id }))
                .await?;
            match op["Operation"]["Status"].as_str() {
                Some("SUCCESS") => return Ok(op["Operation"].clone()),
                Some("FAIL") => {
                    return Err(CloudMapError::Operation {
                        action: action.to_owned(),
                        operation: id.to_owned(),
                        status: format!("FAIL: {}", op["Operation"]["ErrorMessage"]),
                    });
                }
                _ => tokio::time::sleep(Duration::from_millis(25)).await,
            }
        }
        Err(CloudMapError::Operation {
            action: action.to_owned(),
            operation: id.to_owned(),
            status: "still pending after 5s".into(),
        })
    }

    /// CreatePrivateDnsNamespace and wait; returns the namespace id.
    pub async fn create_dns_namespace(&self, name: &str) -> Result<String, CloudMapError> {
        const ACTION: &str = "CreatePrivateDnsNamespace";
        let r = self
            .call(
                ACTION,
                json!({ "Name": name, "Vpc": "vpc-demo", "CreatorRequestId": format!("demo-{name}") }),
            )
            .await?;
        let op_id = r["OperationId"].as_str().unwrap_or_default().to_owned();
        let op = self.wait_operation(ACTION, &op_id).await?;
        Ok(op["Targets"]["NAMESPACE"]
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }

    /// CreateService with A + SRV records (TTL 5 s, MULTIVALUE) and a TCP health check; returns the
    /// service id.
    pub async fn create_service(
        &self,
        namespace_id: &str,
        name: &str,
    ) -> Result<String, CloudMapError> {
        let r = self
            .call(
                "CreateService",
                json!({
                    "Name": name,
                    "NamespaceId": namespace_id,
                    "DnsConfig": {
                        "RoutingPolicy": "MULTIVALUE",
                        "DnsRecords": [{ "Type": "A", "TTL": 5 }, { "Type": "SRV", "TTL": 5 }]
                    },
                    "HealthCheckConfig": { "Type": "TCP", "FailureThreshold": 2 }
                }),
            )
            .await?;
        Ok(r["Service"]["Id"].as_str().unwrap_or_default().to_owned())
    }

    /// RegisterInstance and wait for the operation.
    pub async fn register(
        &self,
        service_id: &str,
        instance_id: &str,
        addr: SocketAddr,
        attributes: &[(&str, &str)],
    ) -> Result<(), CloudMapError> {
        const ACTION: &str = "RegisterInstance";
        let mut attrs = serde_json::Map::new();
        attrs.insert("AWS_INSTANCE_IPV4".into(), addr.ip().to_string().into());
        attrs.insert("AWS_INSTANCE_PORT".into(), addr.port().to_string().into());
        for (k, v) in attributes {
            attrs.insert((*k).into(), (*v).into());
        }
        let r = self
            .call(
                ACTION,
                json!({ "ServiceId": service_id, "InstanceId": instance_id, "Attributes": attrs }),
            )
            .await?;
        let op_id = r["OperationId"].as_str().unwrap_or_default().to_owned();
        self.wait_operation(ACTION, &op_id).await.map(|_| ())
    }

    /// DiscoverInstances with HealthStatus HEALTHY: the instance ids that answer.
    pub async fn healthy_instances(
        &self,
        namespace: &str,
        service: &str,
    ) -> Result<Vec<String>, CloudMapError> {
        let r = self
            .call(
                "DiscoverInstances",
                json!({ "NamespaceName": namespace, "ServiceName": service, "HealthStatus": "HEALTHY" }),
            )
            .await?;
        Ok(r["Instances"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|i| i["InstanceId"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default())
    }
}
