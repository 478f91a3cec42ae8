//! A minimal HTTP/1.1 client over `std::net::TcpStream`, enough to POST JSON to a local
//! OpenAI-compatible server (vLLM, llama.cpp's server, Ollama): `http://` only, one
//! connection per request (`Connection: close`), bodies framed by `Content-Length`,
//! chunked transfer coding or the end of the connection. `https://` is refused with an
//! error that says to use a local endpoint or a TLS-terminating proxy.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use crate::{bail, ensure, Result};

/// The largest response body read (a chat completion is a few kilobytes).
const MAX_BODY: usize = 16 << 20;
/// The largest status line or header line.
const MAX_LINE: usize = 64 << 10;

/// A parsed `http://host[:port]/path` URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct HttpUrl {
    /// The URL as given.
    pub url: String,
    /// `host[:port]` for the `Host` header.
    pub authority: String,
    /// Host name or address (IPv6 without brackets).
    pub host: String,
    /// Port (80 when not given).
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
}

impl HttpUrl {
    /// Parses an `http://` URL; `https://` and other schemes are errors.
    pub fn parse(url: &str) -> Result<HttpUrl> {
        let lower = url.to_ascii_lowercase();
        if lower.starts_with("https://") {
            bail!(
                "{url}: https is not supported by the built-in HTTP client; use a local http:// endpoint \
                 (a vLLM, llama.cpp or Ollama server) or a local proxy that adds TLS"
            );
        }
        ensure!(lower.starts_with("http://"), "{url}: not an http:// URL");
        let rest = &url["http://".len()..];
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], rest[i..].to_string()),
            Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
            None => (rest, "/".to_string()),
        };
        ensure!(!authority.is_empty(), "{url}: no host");
        ensure!(!authority.contains('@'), "{url}: user names in the URL are not supported (use --api-key-env)");
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let Some(end) = v6.find(']') else { bail!("{url}: unclosed [ in the host") };
            let port = match &v6[end + 1..] {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or_else(|| crate::Error::msg(format!("{url}: bad port")))?),
            };
            (v6[..end].to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (authority.to_string(), None),
            }
        };
        let port = match port {
            None => 80,
            Some(p) => p.parse::<u16>().map_err(|_| crate::Error::msg(format!("{url}: bad port {p:?}")))?,
        };
        ensure!(!host.is_empty(), "{url}: no host");
        Ok(HttpUrl { url: url.to_string(), authority: authority.to_string(), host, port, path })
    }
}

/// A response: status, headers (names lower-cased) and body.
#[derive(Clone, Debug)]
pub(crate) struct Response {
    pub status: u16,
    pub reason: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The first value of header `name` (lower-case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// Why a request got no response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum HttpError {
    /// Nothing listens at the address (connection refused): not worth retrying.
    Refused(String),
    /// The host name does not resolve: not worth retrying.
    Resolve(String),
    /// Connecting, sending or receiving took longer than the timeout.
    Timeout(String),
    /// The connection broke (reset, closed early, garbled response): may be retried.
    Io(String),
}

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HttpError::Refused(m) | HttpError::Resolve(m) | HttpError::Timeout(m) | HttpError::Io(m) => f.write_str(m),
        }
    }
}

fn io_error(what: &str, url: &HttpUrl, e: std::io::Error) -> HttpError {
    match e.kind() {
        ErrorKind::TimedOut | ErrorKind::WouldBlock => HttpError::Timeout(format!("{what} {}: timed out", url.url)),
        ErrorKind::ConnectionRefused => HttpError::Refused(format!(
            "cannot connect to {}: connection refused (is the server running and listening on {}:{}?)",
            url.url, url.host, url.port
        )),
        _ => HttpError::Io(format!("{what} {}: {e}", url.url)),
    }
}

/// POSTs `body` (JSON) to `url` with extra `headers`; `timeout` bounds connecting and each
/// read and write. Any status is a response; only transport failures are errors.
pub(crate) fn post_json(
    url: &HttpUrl,
    headers: &[(String, String)],
    body: &[u8],
    timeout: Duration,
) -> std::result::Result<Response, HttpError> {
    let addrs: Vec<SocketAddr> = (url.host.as_str(), url.port)
        .to_socket_addrs()
        .map_err(|e| HttpError::Resolve(format!("cannot resolve the host of {}: {e}", url.url)))?
        .collect();
    let mut last = HttpError::Resolve(format!("cannot resolve the host of {}: no address", url.url));
    let mut stream = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = io_error("cannot connect to", url, e),
        }
    }
    let Some(mut stream) = stream else { return Err(last) };
    let setup = stream
        .set_read_timeout(Some(timeout))
        .and_then(|_| stream.set_write_timeout(Some(timeout)))
        .and_then(|_| stream.set_nodelay(true));
    setup.map_err(|e| io_error("cannot set up the connection to", url, e))?;

    let mut head = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: synthos-engine/{}\r\nContent-Type: application/json\r\n\
         Accept: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        url.path,
        url.authority,
        env!("CARGO_PKG_VERSION"),
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let mut request = head.into_bytes();
    request.extend_from_slice(body);
    stream.write_all(&request).and_then(|_| stream.flush()).map_err(|e| io_error("cannot send to", url, e))?;

    let mut reader = BufReader::new(stream);
    loop {
        let response = read_response(&mut reader, url)?;
        // Interim responses (100 Continue) are followed by the real one.
        if !(100..200).contains(&response.status) {
            return Ok(response);
        }
    }
}

fn read_line(r: &mut impl BufRead, url: &HttpUrl) -> std::result::Result<String, HttpError> {
    let mut buf = Vec::new();
    let n =
        r.by_ref().take(MAX_LINE as u64).read_until(b'\n', &mut buf).map_err(|e| io_error("reading from", url, e))?;
    if n == 0 {
        return Err(HttpError::Io(format!(
            "{}: the server closed the connection without a complete response",
            url.url
        )));
    }
    if !buf.ends_with(b"\n") {
        return Err(HttpError::Io(format!("{}: a response line is cut off or too long", url.url)));
    }
    while buf.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        buf.pop();
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

fn read_response(r: &mut impl BufRead, url: &HttpUrl) -> std::result::Result<Response, HttpError> {
    let status_line = read_line(r, url)?;
    let garbled = || HttpError::Io(format!("{}: not an HTTP response: {status_line:?}", url.url));
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/") {
        return Err(garbled());
    }
    let status: u16 = parts.next().and_then(|s| s.parse().ok()).ok_or_else(garbled)?;
    let reason = parts.next().unwrap_or("").to_string();
    let mut headers = Vec::new();
    loop {
        let line = read_line(r, url)?;
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
        }
        if headers.len() > 1000 {
            return Err(HttpError::Io(format!("{}: too many response headers", url.url)));
        }
    }
    let mut response = Response { status, reason, headers, body: Vec::new() };
    if (100..200).contains(&status) || status == 204 || status == 304 {
        return Ok(response);
    }
    let chunked = response.header("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    if chunked {
        response.body = read_chunked(r, url)?;
    } else if let Some(len) = response.header("content-length") {
        let len: usize = len.parse().map_err(|_| HttpError::Io(format!("{}: bad Content-Length {len:?}", url.url)))?;
        if len > MAX_BODY {
            return Err(HttpError::Io(format!("{}: a response body of {len} bytes is too large", url.url)));
        }
        let mut body = vec![0u8; len];
        r.read_exact(&mut body).map_err(|e| match e.kind() {
            ErrorKind::UnexpectedEof => {
                HttpError::Io(format!("{}: the server closed the connection before the end of the body", url.url))
            }
            _ => io_error("reading from", url, e),
        })?;
        response.body = body;
    } else {
        let mut body = Vec::new();
        r.take(MAX_BODY as u64 + 1).read_to_end(&mut body).map_err(|e| io_error("reading from", url, e))?;
        if body.len() > MAX_BODY {
            return Err(HttpError::Io(format!("{}: the response body is too large", url.url)));
        }
        response.body = body;
    }
    Ok(response)
}

fn read_chunked(r: &mut impl BufRead, url: &HttpUrl) -> std::result::Result<Vec<u8>, HttpError> {
    let mut body = Vec::new();
    loop {
        let line = read_line(r, url)?;
        let size_text = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| HttpError::Io(format!("{}: bad chunk size {size_text:?}", url.url)))?;
        if size == 0 {
            // Trailers, then the blank line.
            for _ in 0..=1000 {
                if read_line(r, url)?.is_empty() {
                    return Ok(body);
                }
            }
            return Err(HttpError::Io(format!("{}: too many trailer lines", url.url)));
        }
        if size > MAX_BODY - body.len() {
            return Err(HttpError::Io(format!("{}: the response body is too large", url.url)));
        }
        let start = body.len();
        body.resize(start + size, 0);
        r.read_exact(&mut body[start..]).map_err(|e| io_error("reading from", url, e))?;
        let end = read_line(r, url)?;
        if !end.is_empty() {
            return Err(HttpError::Io(format!("{}: a chunk is not followed by a line break", url.url)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let u = HttpUrl::parse("http://127.0.0.1:8000/v1/chat/completions").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.path.as_str()), ("127.0.0.1", 8000, "/v1/chat/completions"));
        let u = HttpUrl::parse("http://localhost").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str(), u.authority.as_str()),
            ("localhost", 80, "/", "localhost")
        );
        let u = HttpUrl::parse("http://[::1]:11434/v1").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.path.as_str()), ("::1", 11434, "/v1"));
        assert!(HttpUrl::parse("https://api.example.com").unwrap_err().to_string().contains("local"));
        assert!(HttpUrl::parse("ftp://x").is_err());
        assert!(HttpUrl::parse("http://host:99999/").is_err());
    }

    #[test]
    fn reads_chunked_and_sized_bodies() {
        let url = HttpUrl::parse("http://x/").unwrap();
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n3;x=y\r\nefg\r\n0\r\n\r\n";
        let r = read_response(&mut &raw[..], &url).unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"abcdefg"[..]));
        let raw = b"HTTP/1.0 429 Too Many Requests\r\nContent-Length: 2\r\nRetry-After: 3\r\n\r\nhi";
        let r = read_response(&mut &raw[..], &url).unwrap();
        assert_eq!((r.status, r.header("retry-after"), r.body.as_slice()), (429, Some("3"), &b"hi"[..]));
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort";
        assert!(matches!(read_response(&mut &raw[..], &url), Err(HttpError::Io(_))));
        let raw = b"garbage\r\n";
        assert!(matches!(read_response(&mut &raw[..], &url), Err(HttpError::Io(_))));
        // A chunk size near usize::MAX (it overflowed the body-size check once).
        let raw =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\nffffffffffffffff\r\nxy\r\n0\r\n\r\n";
        match read_response(&mut &raw[..], &url) {
            Err(HttpError::Io(e)) => assert!(e.contains("too large"), "{e}"),
            other => panic!("{other:?}"),
        }
    }

    /// Seeded damage to well-formed responses and URLs: errors, never panics.
    #[test]
    fn damaged_responses_and_urls_are_errors() {
        let url = HttpUrl::parse("http://x/").unwrap();
        let seeds: [&[u8]; 3] = [
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n3;x=y\r\nefg\r\n0\r\nT: 1\r\n\r\n",
            b"HTTP/1.0 429 Too Many Requests\r\nContent-Length: 2\r\nRetry-After: 3\r\n\r\nhi",
            b"HTTP/1.1 204 No Content\r\n\r\n",
        ];
        const TOKENS: [&[u8]; 8] =
            [b"f", b"ffffffffffffffff", b"\r\n", b"\n", b":", b";", b" ", b"99999999999999999999"];
        let mut rng = crate::Rng::new(5);
        let mut below = |n: usize| (rng.next_u64() % n.max(1) as u64) as usize;
        for seed in seeds {
            for _ in 0..3000 {
                let mut b = seed.to_vec();
                match below(4) {
                    0 => b.truncate(below(b.len())),
                    1 => {
                        let i = below(b.len());
                        b[i] = below(256) as u8;
                    }
                    2 => {
                        let i = below(b.len());
                        let t = TOKENS[below(TOKENS.len())];
                        b.splice(i..i, t.iter().copied());
                    }
                    _ => {
                        let i = below(b.len());
                        let j = (i + 1 + below(8)).min(b.len());
                        b.drain(i..j);
                    }
                }
                let _ = read_response(&mut &b[..], &url);
                let _ = HttpUrl::parse(&String::from_utf8_lossy(&b));
            }
        }
        for u in [
            "http://",
            "http://[",
            "http://[::1",
            "http://[::1]x",
            "http://h:",
            "http://h:-1",
            "HTTP://H/\u{e9}",
            "http://\u{e9}:80?q",
        ] {
            let _ = HttpUrl::parse(u);
        }
    }
}
