//! `--http '[METHOD] URL'` and `--wait-http URL`: a method and a URL in, a checked
//! `http::Request` out.
//!
//! Only what prestop can send honestly and within its deadline passes: `http://` to an IP
//! address or `localhost` (a name lookup cannot be bounded), or nginx's unix socket form
//! `http://unix:/PATH:/URI`. Anything that could split or forge the request line (a space, a
//! control character), a fragment (never sent), or credentials (they would reach the log) is
//! refused with the reason, and the value is shown with any credentials masked.

use std::ffi::{OsStr, OsString};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;

use super::no_controls;
use crate::error::Error;
use crate::http::{Endpoint, METHODS, Request};

/// A stop action: `URL` or `METHOD URL`; GET when no method is given.
pub fn action(value: &OsStr) -> Result<Request, Error> {
    let option = "--http";
    let text = checked_text(option, value)?;
    let words: Vec<&str> = text.split(' ').filter(|w| !w.is_empty()).collect();
    let (method, url) = match words.as_slice() {
        [url] => ("GET", *url),
        [method, url] => (self::method(option, text, method)?, *url),
        [] => return Err(usage(option, text, "empty: expected [METHOD] URL")),
        _ => {
            return Err(usage(
                option,
                text,
                "expected [METHOD] URL; a URL holds no space (write %20)",
            ));
        }
    };
    request(option, text, method, url)
}

/// A wait condition: a URL, always asked with GET.
pub fn wait(value: &OsStr) -> Result<Request, Error> {
    let option = "--wait-http";
    let text = checked_text(option, value)?;
    match text.trim_matches(' ') {
        "" => Err(usage(option, text, "empty: expected a URL")),
        url if url.contains(' ') => {
            let why = if METHODS.iter().any(|m| url.starts_with(&format!("{m} "))) {
                "expected a URL alone: the request is always GET"
            } else {
                "a URL holds no space (write %20)"
            };
            Err(usage(option, text, why))
        }
        url => request(option, text, "GET", url),
    }
}

/// The value as text without control characters, or the error with the value masked.
fn checked_text<'a>(option: &str, value: &'a OsStr) -> Result<&'a str, Error> {
    no_controls(option, &masked(value))?;
    value
        .to_str()
        .ok_or_else(|| Error::usage(option, masked(value), "not valid UTF-8"))
}

/// The usage error, with credentials in the value masked.
fn usage(option: &str, value: &str, reason: &str) -> Error {
    Error::usage(option, masked(value.as_ref()), reason)
}

fn method(option: &str, value: &str, word: &str) -> Result<&'static str, Error> {
    if let Some(known) = METHODS.iter().find(|m| **m == word) {
        return Ok(known);
    }
    let reason = match METHODS.iter().find(|m| m.eq_ignore_ascii_case(word)) {
        Some(upper) => format!("methods are case-sensitive: write {upper}"),
        // A URL written first (`URL GET`), or cut by a space: not repeated, as it may hold
        // a password.
        None if word.contains("://") => "expected [METHOD] URL, the method first".into(),
        None => format!(
            "unknown method {word}; expected one of {}",
            METHODS.join(", ")
        ),
    };
    Err(usage(option, value, &reason))
}

fn request(option: &str, value: &str, method: &'static str, url: &str) -> Result<Request, Error> {
    let bad = |why: &str| usage(option, value, why);
    let (scheme, rest) = url.split_once("://").ok_or_else(|| {
        bad("expected a URL such as http://127.0.0.1:8080/path or http://unix:/PATH:/path")
    })?;
    if scheme.eq_ignore_ascii_case("https") {
        return Err(bad(
            "https is not supported: prestop speaks plain HTTP to the pod's own endpoints \
             (loopback admin APIs), and TLS would more than double its size",
        ));
    }
    if !scheme.eq_ignore_ascii_case("http") {
        return Err(bad("only http:// URLs are supported"));
    }
    if !url.is_ascii() {
        return Err(bad(
            "holds a character that is not ASCII (percent-encode it)",
        ));
    }
    if url.contains('#') {
        return Err(bad(
            "has a fragment (#...), which is never sent to a server: remove it, or write %23",
        ));
    }
    if let Some(socket) = rest.strip_prefix("unix:") {
        let (path, target) = socket
            .split_once(':')
            .filter(|(path, target)| path.starts_with('/') && target.starts_with('/'))
            .ok_or_else(|| {
                bad(
                    "expected http://unix:/PATH/TO/SOCKET:/URI (the socket's path ends at the \
                     second colon)",
                )
            })?;
        // The kernel's `sun_path` holds 108 bytes, the terminating NUL included.
        if path.len() > 107 {
            return Err(bad(
                "the socket's path is longer than the 107 bytes a unix socket address holds",
            ));
        }
        return Ok(Request {
            method,
            endpoint: Endpoint::Unix(PathBuf::from(path)),
            host: "localhost".into(),
            target: target.into(),
            url: url.into(),
        });
    }
    let split = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, target) = rest.split_at(split);
    if authority.contains('@') {
        return Err(bad(
            "holds a user name or password, which prestop does not send and would not log",
        ));
    }
    let (host, port) = host_and_port(authority).map_err(|why| bad(&why))?;
    let port = match port {
        None => 80,
        Some(digits) => match digits.parse::<u16>() {
            Ok(0) => return Err(bad("port 0 is no port")),
            Ok(port) if digits.bytes().all(|b| b.is_ascii_digit()) => port,
            _ => return Err(bad("expected a port from 1 to 65535 after the colon")),
        },
    };
    let addrs = match host {
        Host::Ip(ip) => vec![SocketAddr::new(ip, port)],
        Host::Localhost => vec![
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port),
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), port),
        ],
    };
    let target = match target.strip_prefix('?') {
        Some(_) => format!("/{target}"),
        None if target.is_empty() => "/".into(),
        None => target.into(),
    };
    Ok(Request {
        method,
        endpoint: Endpoint::Tcp(addrs),
        host: authority.into(),
        target,
        url: url.into(),
    })
}

enum Host {
    Ip(IpAddr),
    Localhost,
}

/// The host of an authority (an IP address, `[IPv6]`, or `localhost`) and its port, if
/// one is written.
fn host_and_port(authority: &str) -> Result<(Host, Option<&str>), String> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (v6, after) = rest
            .split_once(']')
            .ok_or("expected [IPv6] or [IPv6]:PORT as the host")?;
        let v6: Ipv6Addr = v6
            .parse()
            .map_err(|_| format!("{v6} is not an IPv6 address (nor can it have a zone)"))?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or("expected :PORT after ]")?),
        };
        return Ok((Host::Ip(IpAddr::V6(v6)), port));
    } else {
        match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err("no host: expected http://HOST[:PORT]/PATH".into());
    }
    if host.eq_ignore_ascii_case("localhost") {
        return Ok((Host::Localhost, port));
    }
    match host.parse::<Ipv4Addr>() {
        Ok(v4) => Ok((Host::Ip(IpAddr::V4(v4)), port)),
        Err(_) => Err(format!(
            "host {host} is not an IP address: prestop resolves no names (a lookup could \
             outlast the deadline); use 127.0.0.1, [::1] or localhost"
        )),
    }
}

/// The value as an error may show it: the user name and password of a URL masked.
fn masked(value: &OsStr) -> OsString {
    let text = value.to_string_lossy();
    let mut rest: &str = &text;
    let mut out = String::with_capacity(text.len());
    while let Some(at) = rest.find("://") {
        let (before, after) = rest.split_at(at + 3);
        out.push_str(before);
        // Up to the last `@` of the value rather than of the authority: a password may hold
        // a `/`, `?` or space its writer did not encode, and a path's `@` masked too costs
        // nothing in an error message.
        match after.rfind('@') {
            Some(userinfo_end) => {
                out.push_str("***");
                rest = &after[userinfo_end..];
            }
            None => rest = after,
        }
    }
    out.push_str(rest);
    out.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(value: &str) -> Request {
        action(value.as_ref()).unwrap_or_else(|e| panic!("{value:?}: {e}"))
    }

    fn refused(value: &str) -> String {
        let e = action(value.as_ref()).expect_err(value).to_string();
        assert!(e.starts_with("--http \""), "{e}");
        assert!(!e.contains('\n'), "{e}");
        e
    }

    #[test]
    fn urls_to_ips_localhost_and_sockets() {
        let envoy = ok("POST http://127.0.0.1:15000/healthcheck/fail");
        assert_eq!(envoy.method, "POST");
        assert_eq!(
            envoy.endpoint,
            Endpoint::Tcp(vec!["127.0.0.1:15000".parse().unwrap()])
        );
        assert_eq!(envoy.host, "127.0.0.1:15000");
        assert_eq!(envoy.target, "/healthcheck/fail");
        assert_eq!(
            envoy.to_string(),
            "POST http://127.0.0.1:15000/healthcheck/fail"
        );
        let plain = ok("http://[::1]/");
        assert_eq!(plain.method, "GET");
        assert_eq!(
            plain.endpoint,
            Endpoint::Tcp(vec!["[::1]:80".parse().unwrap()])
        );
        assert_eq!(plain.host, "[::1]");
        let local = ok("POST   http://localhost:15020/drain");
        assert_eq!(
            local.endpoint,
            Endpoint::Tcp(vec![
                "127.0.0.1:15020".parse().unwrap(),
                "[::1]:15020".parse().unwrap()
            ])
        );
        // Sent as written: Envoy reads its own regular expressions in the query.
        let stats = ok(r"GET http://127.0.0.1:19000//stats?filter=^listener\..*$&format=json");
        assert_eq!(stats.target, r"//stats?filter=^listener\..*$&format=json");
        assert_eq!(ok("http://127.0.0.1?x=1").target, "/?x=1");
        let socket = ok("POST http://unix:/admin/admin.sock:/healthcheck/fail");
        assert_eq!(socket.endpoint, Endpoint::Unix("/admin/admin.sock".into()));
        assert_eq!(socket.host, "localhost");
        assert_eq!(socket.target, "/healthcheck/fail");
        assert_eq!(
            wait("http://127.0.0.1:8022/wait-for-drain".as_ref())
                .unwrap()
                .method,
            "GET"
        );
    }

    #[test]
    fn what_cannot_be_sent_honestly_is_refused() {
        for (value, why) in [
            ("ftp://127.0.0.1/x", "only http://"),
            ("https://127.0.0.1/x", "TLS would more than double"),
            ("http:///x", "no host"),
            ("http://:80/x", "no host"),
            ("http://127.0.0.1:0/", "port 0"),
            ("http://127.0.0.1:65536/", "from 1 to 65535"),
            ("http://127.0.0.1:/", "from 1 to 65535"),
            ("http://127.0.0.1:+80/", "from 1 to 65535"),
            ("FETCH http://127.0.0.1/", "unknown method FETCH"),
            ("post http://127.0.0.1/", "write POST"),
            ("CONNECT http://127.0.0.1/", "unknown method"),
            ("GET http://127.0.0.1/a b", "holds no space"),
            ("http://example.com/", "resolves no names"),
            ("http://127.1/", "resolves no names"),
            ("http://[fe80::1%25eth0]/", "not an IPv6 address"),
            ("http://[::1/", "expected [IPv6]"),
            ("http://127.0.0.1/x#top", "fragment"),
            ("http://127.0.0.1/caf\u{e9}", "not ASCII"),
            ("http://unix:/admin/admin.sock", "second colon"),
            ("http://unix:admin.sock:/x", "second colon"),
            (&format!("http://unix:/{}:/x", "s".repeat(107)), "107 bytes"),
            ("127.0.0.1:8080/x", "expected a URL"),
            ("", "empty"),
        ] {
            let e = refused(value);
            assert!(e.contains(why), "{value:?}: {e}");
        }
        let e = refused("GET http://127.0.0.1/a\nb");
        assert!(e.contains("control character"), "{e}");
    }

    #[test]
    fn credentials_are_refused_and_never_shown() {
        for value in [
            "POST http://admin:s3cret@127.0.0.1:15000/x",
            "http://s3cret@127.0.0.1/",
            "http://admin:s3cret@127.0.0.1/\n",
            // The URL first, where the method belongs.
            "http://admin:s3cret@127.0.0.1:18080/ GET",
            // A password with a `/` or `?` its writer did not encode.
            "http://admin:s3/cret@127.0.0.1/",
            "POST http://admin:s3?cret@127.0.0.1/",
        ] {
            let e = refused(value);
            assert!(!e.contains("s3cret") && !e.contains("cret@"), "{e}");
            assert!(e.contains("***@127.0.0.1"), "{e}");
        }
        let e = refused("http://user:pa ss@127.0.0.1/");
        assert!(!e.contains("pa"), "{e}");
        let e = wait("http://u:s3cret@127.0.0.1/ x".as_ref())
            .unwrap_err()
            .to_string();
        assert!(!e.contains("s3cret"), "{e}");
    }

    #[test]
    fn a_wait_url_takes_no_method() {
        let e = wait("GET http://127.0.0.1/".as_ref())
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("--wait-http \"GET http"), "{e}");
        assert!(e.contains("always GET"), "{e}");
    }
}
