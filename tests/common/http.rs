//! A minimal HTTP/1.1 client for tests (one connection per request).

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, body::Incoming};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    /// The `x-backend` header the fake model servers set.
    pub fn backend(&self) -> &str {
        self.header("x-backend").unwrap_or("")
    }
}

pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// Sends a request and returns the response head with the body unread.
pub async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Vec<u8>>,
) -> Result<hyper::Response<Incoming>, Error> {
    let stream = TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let has_body = body.is_some();
    let body = Full::new(Bytes::from(body.unwrap_or_default()));
    let mut req = req.body(body)?;
    if has_body && !req.headers().contains_key("content-type") {
        req.headers_mut()
            .insert("content-type", "application/json".parse()?);
    }
    Ok(sender.send_request(req).await?)
}

pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Vec<u8>>,
) -> Result<Reply, Error> {
    let resp = send(addr, method, path, headers, body).await?;
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned()))
        .collect();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok(Reply {
        status,
        headers,
        body,
    })
}

pub async fn get(addr: SocketAddr, path: &str) -> Result<Reply, Error> {
    request(addr, "GET", path, &[], None).await
}

pub async fn post_json(
    addr: SocketAddr,
    path: &str,
    body: &serde_json::Value,
) -> Result<Reply, Error> {
    request(addr, "POST", path, &[], Some(body.to_string().into_bytes())).await
}
