//! The kubelet's image matching (`matchImages` and response `auth` keys): both strings are
//! read as schemeless URLs; ports must be equal, hosts must have as many dot-separated labels,
//! each label is a `filepath.Match` glob, and the pattern's path is a string prefix of the
//! image's path.

/// A schemeless URL split the way the kubelet splits it.
#[derive(Debug, PartialEq, Eq)]
struct SplitUrl<'a> {
    labels: Vec<&'a str>,
    port: &'a str,
    path: &'a str,
}

/// Reads `s` as `https://` + `s` does: authority up to the first `/`, `?` or `#`.
fn split_url(s: &str) -> Option<SplitUrl<'_>> {
    let end = s.find(['/', '?', '#']).unwrap_or(s.len());
    let authority = &s[..end];
    let rest = &s[end..];
    let path = &rest[..rest.find(['?', '#']).unwrap_or(rest.len())];
    // User info is not part of the host.
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let (host, port) = split_host_port(host_port)?;
    Some(SplitUrl {
        labels: host.split('.').collect(),
        port,
        path,
    })
}

/// `net.SplitHostPort`, falling back to the whole string and no port when there is none.
fn split_host_port(s: &str) -> Option<(&str, &str)> {
    if let Some(inner) = s.strip_prefix('[') {
        let (host, after) = inner.split_once(']')?;
        return match after.strip_prefix(':') {
            Some(port) => valid_port(port).then_some((host, port)),
            None if after.is_empty() => Some((host, "")),
            None => None,
        };
    }
    match s.rsplit_once(':') {
        // More than one colon without brackets: Go's URL parser refuses it.
        Some((host, _)) if host.contains(':') => None,
        Some((host, port)) => valid_port(port).then_some((host, port)),
        None => Some((s, "")),
    }
}

fn valid_port(port: &str) -> bool {
    port.bytes().all(|b| b.is_ascii_digit())
}

/// Whether image-matching `pattern` matches `image` (the kubelet's `URLsMatchStr`).
pub fn urls_match(pattern: &str, image: &str) -> bool {
    let (Some(glob), Some(target)) = (split_url(pattern), split_url(image)) else {
        return false;
    };
    glob.port == target.port
        && glob.labels.len() == target.labels.len()
        && target.path.starts_with(glob.path)
        && glob
            .labels
            .iter()
            .zip(&target.labels)
            .all(|(g, t)| glob_match(g.as_bytes(), t.as_bytes()) == Some(true))
}

/// Go's `filepath.Match` on one label: `*`, `?`, `[...]` (ranges, `^` negation) and `\`
/// escapes; `None` for a malformed pattern, which the kubelet treats as no match.
fn glob_match(pattern: &[u8], name: &[u8]) -> Option<bool> {
    match pattern.split_first() {
        None => Some(name.is_empty()),
        Some((b'*', rest)) => {
            // Validate the rest of the pattern even when the name runs out, as Go does.
            for skip in 0..=name.len() {
                if glob_match(rest, &name[skip..])? {
                    return Some(true);
                }
            }
            Some(false)
        }
        Some((b'?', rest)) => match name.split_first() {
            Some((_, name_rest)) => glob_match(rest, name_rest),
            None => {
                glob_match(rest, name)?;
                Some(false)
            }
        },
        Some((b'[', rest)) => {
            let (matched, after) = match_class(rest, name.first().copied())?;
            if !matched {
                return Some(false);
            }
            glob_match(after, &name[1..])
        }
        Some((b'\\', rest)) => {
            let (&lit, rest) = rest.split_first()?;
            match name.split_first() {
                Some((&c, name_rest)) if c == lit => glob_match(rest, name_rest),
                _ => Some(false),
            }
        }
        Some((&lit, rest)) => match name.split_first() {
            Some((&c, name_rest)) if c == lit => glob_match(rest, name_rest),
            _ => Some(false),
        },
    }
}

/// Matches `c` against the class that starts at `class` (after `[`); returns whether it
/// matched and the pattern after `]`. `None` for a malformed class.
fn match_class(class: &[u8], c: Option<u8>) -> Option<(bool, &[u8])> {
    let (negated, mut p) = match class.first() {
        Some(b'^') => (true, &class[1..]),
        _ => (false, class),
    };
    let mut matched = false;
    let mut first = true;
    loop {
        match p.first()? {
            b']' if !first => {
                p = &p[1..];
                break;
            }
            _ => {}
        }
        first = false;
        let (lo, after) = class_char(p)?;
        p = after;
        let hi = if p.first() == Some(&b'-') {
            let (hi, after) = class_char(&p[1..])?;
            p = after;
            hi
        } else {
            lo
        };
        if let Some(c) = c {
            matched |= lo <= c && c <= hi;
        }
    }
    Some((c.is_some() && matched != negated, p))
}

fn class_char(p: &[u8]) -> Option<(u8, &[u8])> {
    match p {
        [b'\\', c, rest @ ..] => Some((*c, rest)),
        [b'-' | b']', ..] | [] => None,
        [c, rest @ ..] => Some((*c, rest)),
    }
}

/// The registry of an image as the kubelet's cache keys it: the text before the first `/`.
pub fn registry_of(image: &str) -> &str {
    image.split('/').next().unwrap_or(image)
}

/// The host of an image without port, as Go's `url.Hostname()` gives it.
pub fn host_of(image: &str) -> &str {
    let registry = registry_of(image);
    let registry = registry.rsplit_once('@').map_or(registry, |(_, h)| h);
    split_host_port(registry).map_or(registry, |(h, _)| h)
}

/// The image without tag or digest (the kubelet's `Image` cache key).
pub fn image_without_tag(image: &str) -> &str {
    let image = image.split('@').next().unwrap_or(image);
    match image.rfind(':') {
        Some(i) if !image[i..].contains('/') => &image[..i],
        _ => image,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The kubelet's `TestURLsMatch` (pkg/credentialprovider/keyring_test.go), case by case.
    #[test]
    fn urls_match_kubelet_cases() {
        let cases = [
            // match when there is no path component
            ("*.kubernetes.io", "prefix.kubernetes.io", true),
            ("prefix.*.io", "prefix.kubernetes.io", true),
            ("prefix.kubernetes.*", "prefix.kubernetes.io", true),
            ("*-good.kubernetes.io", "prefix-good.kubernetes.io", true),
            // match with path components
            ("*.kubernetes.io/blah", "prefix.kubernetes.io/blah", true),
            ("prefix.*.io/foo", "prefix.kubernetes.io/foo/bar", true),
            // match with path components and ports
            (
                "*.kubernetes.io:1111/blah",
                "prefix.kubernetes.io:1111/blah",
                true,
            ),
            (
                "prefix.*.io:1111/foo",
                "prefix.kubernetes.io:1111/foo/bar",
                true,
            ),
            // no match when number of parts mismatch
            ("*.kubernetes.io", "kubernetes.io", false),
            ("*.*.kubernetes.io", "prefix.kubernetes.io", false),
            ("*.*.kubernetes.io", "kubernetes.io", false),
            // no match when some parts mismatch
            ("kubernetes.io", "kubernetes.com", false),
            ("k*.io", "quay.io", false),
            // no match when ports mismatch
            (
                "*.kubernetes.io:1234/blah",
                "prefix.kubernetes.io:1111/blah",
                false,
            ),
            (
                "prefix.*.io/foo",
                "prefix.kubernetes.io:1111/foo/bar",
                false,
            ),
        ];
        for (glob, target, want) in cases {
            assert_eq!(urls_match(glob, target), want, "{glob} vs {target}");
        }
    }

    // The kubelet's `TestKeyringHit`-style lookups: the key matches `target/foo/bar`.
    #[test]
    fn keyring_for_glob_kubelet_cases() {
        let cases = [
            ("hello.kubernetes.io", "hello.kubernetes.io"),
            ("*.docker.io", "prefix.docker.io"),
            ("prefix.*.io", "prefix.docker.io"),
            ("prefix.docker.*", "prefix.docker.io"),
            ("*.docker.io/path", "prefix.docker.io/path"),
            ("prefix.*.io/path", "prefix.docker.io/path/subpath"),
            ("prefix.docker.*/path", "prefix.docker.io/path"),
            ("*.docker.io:8888", "prefix.docker.io:8888"),
            ("prefix.*.io:8888", "prefix.docker.io:8888"),
            ("prefix.docker.*:8888", "prefix.docker.io:8888"),
            ("*.docker.io/path:1111", "prefix.docker.io/path:1111"),
            ("prefix.docker.*/path:1111", "prefix.docker.io/path:1111"),
            ("prefix.docker.io:1111", "prefix.docker.io:1111/path"),
            ("*.docker.io:1111", "prefix.docker.io:1111/path"),
        ];
        for (glob, target) in cases {
            let image = format!("{target}/foo/bar");
            assert!(urls_match(glob, &image), "{glob} should match {image}");
        }
    }

    // The kubelet's `TestKeyringMiss`.
    #[test]
    fn keyring_miss_kubelet_cases() {
        let cases = [
            ("hello.kubernetes.io", "world.mesos.org/foo/bar"),
            ("*.docker.com", "prefix.docker.io"),
            ("suffix.*.io", "prefix.docker.io"),
            ("prefix.docker.c*", "prefix.docker.io"),
            (
                "prefix.*.io/path:1111",
                "prefix.docker.io/path/subpath:1111",
            ),
        ];
        for (glob, target) in cases {
            let image = format!("{target}/foo/bar");
            assert!(!urls_match(glob, &image), "{glob} should not match {image}");
        }
    }

    // The kubelet's `TestDockerKeyringLookup`: path prefixes are string prefixes.
    #[test]
    fn docker_keyring_lookup_kubelet_cases() {
        assert!(urls_match("bar.example.com", "bar.example.com"));
        assert!(urls_match("bar.example.com/pong", "bar.example.com/pong"));
        assert!(!urls_match("bar.example.com/pong", "bar.example.com/ping"));
        assert!(urls_match("bar.example.com/pong", "bar.example.com/pongz"));
        assert!(urls_match(
            "bar.example.com/pong",
            "bar.example.com/pong/pang"
        ));
        assert!(!urls_match("bar.example.com", "example.com"));
        assert!(!urls_match("bar.example.com", "foo.example.com"));
    }

    // The documented ECR patterns: one glob per label, so `.cn` needs its own pattern.
    #[test]
    fn ecr_patterns_from_the_kubelet_docs() {
        let image = "123456789012.dkr.ecr.us-west-2.amazonaws.com/repo:tag";
        assert!(urls_match("*.dkr.ecr.*.amazonaws.com", image));
        assert!(!urls_match(
            "*.dkr.ecr.*.amazonaws.com",
            "123456789012.dkr.ecr.cn-north-1.amazonaws.com.cn/repo"
        ));
        assert!(urls_match(
            "*.dkr.ecr.*.amazonaws.com.cn",
            "123456789012.dkr.ecr.cn-north-1.amazonaws.com.cn/repo"
        ));
        // A pattern without a port does not match a registry with one.
        assert!(!urls_match("127.0.0.1", "127.0.0.1:5000/app"));
        assert!(urls_match("127.0.0.1:5000", "127.0.0.1:5000/app:v1"));
    }

    #[test]
    fn glob_classes_escapes_and_malformed_patterns() {
        assert!(urls_match("app[0-9].k8s.io", "app7.k8s.io"));
        assert!(!urls_match("app[^0-9].k8s.io", "app7.k8s.io"));
        // `?` starts the query in Go's URL parser, so it never globs in a host.
        assert!(!urls_match("a?c.io", "abc.io"));
        assert!(urls_match("a?c.io", "a"));
        assert!(urls_match("a\\*c.io", "a*c.io"));
        assert!(!urls_match("a\\*c.io", "abc.io"));
        // Malformed classes never match (Go returns ErrBadPattern).
        assert!(!urls_match("app[.k8s.io", "app[.k8s.io"));
        assert!(!urls_match("*[.io", "a.io"));
    }

    #[test]
    fn registry_host_and_image_keys() {
        assert_eq!(registry_of("reg.io:5000/a/b:1"), "reg.io:5000");
        assert_eq!(host_of("reg.io:5000/a/b:1"), "reg.io");
        assert_eq!(host_of("public.ecr.aws/x/y"), "public.ecr.aws");
        assert_eq!(image_without_tag("reg.io:5000/a/b:1"), "reg.io:5000/a/b");
        assert_eq!(image_without_tag("reg.io:5000/a/b"), "reg.io:5000/a/b");
        assert_eq!(image_without_tag("reg.io/a@sha256:abc"), "reg.io/a");
    }
}
