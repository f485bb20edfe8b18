//! Bounded reads of control-plane answers: JWKS, token introspection, OpenFGA, token
//! endpoints. Every such answer is read to at most a fixed size (besides the call's
//! timeout), so a misbehaving peer cannot make the proxy buffer without limit.

use serde::de::DeserializeOwned;

/// Largest control-plane answer read (JWKS, introspection, OpenFGA, token replies).
pub const MAX_CONTROL_BYTES: usize = 1024 * 1024;

/// The builder of every control-plane HTTP client (JWKS, introspection, OpenFGA, token
/// endpoints, the seeding tool). Redirects are never followed: a `3xx` is answered as
/// the error it is by the caller (every caller takes only `2xx`), so a peer cannot send
/// the proxy's credentials, or a token being introspected, to another host.
pub fn control_client() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .user_agent(concat!("smart-fhir-proxy/", env!("CARGO_PKG_VERSION")))
        .redirect(reqwest::redirect::Policy::none())
}

#[derive(Debug)]
pub enum ReadError {
    /// More than the allowed bytes (declared or sent).
    TooLarge,
    Transport(reqwest::Error),
    Json(serde_json::Error),
}

/// The whole body of `resp`, or an error once it exceeds `max` bytes.
pub async fn read_capped(mut resp: reqwest::Response, max: usize) -> Result<Vec<u8>, ReadError> {
    if resp.content_length().is_some_and(|l| l > max as u64) {
        return Err(ReadError::TooLarge);
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(ReadError::Transport)? {
        if body.len() + chunk.len() > max {
            return Err(ReadError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The body of `resp` as JSON, read with [`read_capped`] to [`MAX_CONTROL_BYTES`].
pub async fn read_json<T: DeserializeOwned>(resp: reqwest::Response) -> Result<T, ReadError> {
    let body = read_capped(resp, MAX_CONTROL_BYTES).await?;
    serde_json::from_slice(&body).map_err(ReadError::Json)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A loopback server answering one request with `body` sent chunked (no length).
    async fn serve_chunked(body: Vec<u8>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let mut out =
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
                    .to_vec();
            for chunk in body.chunks(1000) {
                out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                out.extend_from_slice(chunk);
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b"0\r\n\r\n");
            let _ = s.write_all(&out).await;
        });
        format!("http://{addr}/")
    }

    #[tokio::test]
    async fn undeclared_bodies_are_cut_at_the_limit() {
        let http = reqwest::Client::new();
        let url = serve_chunked(vec![b'x'; 5000]).await;
        let resp = http.get(&url).send().await.unwrap();
        assert!(matches!(
            read_capped(resp, 4999).await,
            Err(ReadError::TooLarge)
        ));
        let url = serve_chunked(vec![b'x'; 5000]).await;
        let resp = http.get(&url).send().await.unwrap();
        assert_eq!(read_capped(resp, 5000).await.unwrap().len(), 5000);
        let url = serve_chunked(br#"{"a":1}"#.to_vec()).await;
        let resp = http.get(&url).send().await.unwrap();
        let v: serde_json::Value = read_json(resp).await.unwrap();
        assert_eq!(v["a"], 1);
    }

    #[tokio::test]
    async fn control_clients_never_follow_a_redirect() {
        // The place a redirect points to: counts every connection.
        let target = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target_url = format!("http://{}/elsewhere", target.local_addr().unwrap());
        let reached = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = std::sync::Arc::clone(&reached);
        tokio::spawn(async move {
            while let Ok((mut s, _)) = target.accept().await {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}",
                    )
                    .await;
            }
        });
        let http = control_client().build().unwrap();
        for status in [
            "301 Moved Permanently",
            "302 Found",
            "303 See Other",
            "307 Temporary Redirect",
            "308 Permanent Redirect",
        ] {
            let redirect = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}/jwks", redirect.local_addr().unwrap());
            let answer = format!(
                "HTTP/1.1 {status}\r\nlocation: {target_url}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            );
            tokio::spawn(async move {
                let (mut s, _) = redirect.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(answer.as_bytes()).await;
            });
            let resp = http
                .post(&url)
                .bearer_auth("credential")
                .body("token=abc")
                .send()
                .await
                .unwrap();
            assert!(
                resp.status().is_redirection(),
                "{status}: {}",
                resp.status()
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert_eq!(reached.load(std::sync::atomic::Ordering::SeqCst), 0);
    }
}
