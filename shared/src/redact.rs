//! Redacting URLs for display: a Redis URL may carry a password (`redis://:pw@host`).

/// The URL with any password replaced by `***` (user names are kept). Sentinel URLs
/// (`redis+sentinel://:pw@h1:26379,h2:26379/master`) are redacted by their own parser.
pub fn redact_url(url: &str) -> String {
    let scheme = url.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
    if let Some(s) = scheme.filter(|s| s.ends_with("+sentinel")) {
        return match crate::queue::RedisTarget::parse(url) {
            Ok(t) => t.redacted(),
            Err(_) => format!("{s}://<unparseable>"),
        };
    }
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Ok(u) => u.to_string(),
        // Unparseable: show only the scheme, never the rest.
        Err(_) => match url.split_once("://") {
            Some((scheme, _)) => format!("{scheme}://<unparseable>"),
            None => "<unparseable URL>".to_owned(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_shown() {
        assert_eq!(
            redact_url("redis://:s3cret@127.0.0.1:6379/0"),
            "redis://:***@127.0.0.1:6379/0"
        );
        assert_eq!(
            redact_url("rediss://u:s3cret@h:6380"),
            "rediss://u:***@h:6380"
        );
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        assert!(!redact_url("redis://:s3cret@[bad").contains("s3cret"));
        assert_eq!(
            redact_url("redis+sentinel://:s3cret@127.0.0.2:26379,127.0.0.3:26379/lf"),
            "redis+sentinel://:***@127.0.0.2:26379,127.0.0.3:26379/lf/0"
        );
        assert_eq!(
            redact_url("rediss+sentinel://:s3cret@h:1/lf/x"),
            "rediss+sentinel://<unparseable>"
        );
    }
}
