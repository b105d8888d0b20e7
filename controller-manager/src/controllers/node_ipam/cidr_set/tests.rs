//! Upstream `cidrset/cidr_set_test.go` cases, named after their test functions.

use std::collections::HashSet;

use super::*;

fn net(text: &str) -> IpNet {
    text.parse().expect("CIDR")
}

fn set(cluster: &str, mask: u8) -> CidrSet {
    CidrSet::new(net(cluster), mask, SetMetrics::default()).expect("CIDR set")
}

/// Every used block's index.
fn used(set: &CidrSet) -> Vec<usize> {
    (0..set.max).filter(|i| set.bit(*i)).collect()
}

#[test]
fn test_cidr_set_fully_allocated() {
    for (cluster, mask, expected) in [
        ("127.123.234.0/30", 30, "127.123.234.0/30"),
        ("beef:1234::/30", 30, "beef:1234::/30"),
    ] {
        let mut a = set(cluster, mask);
        let p = a.allocate_next().expect("first allocation");
        assert_eq!(p, net(expected));
        assert!(matches!(a.allocate_next(), Err(CidrSetError::Full { .. })));
        a.release(&p).expect("release");
        assert_eq!(a.allocate_next().expect("after release"), net(expected));
        assert!(matches!(a.allocate_next(), Err(CidrSetError::Full { .. })));
    }
}

#[test]
fn test_index_to_cidr_block() {
    for (cluster, mask, index, expected) in [
        ("127.123.3.0/16", 24, 0, "127.123.0.0/24"),
        ("127.123.0.0/16", 24, 15, "127.123.15.0/24"),
        ("127.123.0.0/16", 24, 255, "127.123.255.0/24"),
        ("127.123.0.0/16", 32, 5, "127.123.0.5/32"),
        ("2001:0db8:1234:3::/48", 64, 0, "2001:db8:1234::/64"),
        ("2001:0db8:1234::/48", 64, 15, "2001:db8:1234:f::/64"),
        ("2001:0db8:85a3::/48", 64, 65535, "2001:db8:85a3:ffff::/64"),
        ("2001:0db8:85a3::/112", 128, 257, "2001:db8:85a3::101/128"),
        (
            "2001:0db8:85a3:0:1::/56",
            72,
            300,
            "2001:db8:85a3:1:2c00::/72",
        ),
    ] {
        let a = set(cluster, mask);
        assert_eq!(
            a.index_to_cidr(index),
            net(expected),
            "{cluster} /{mask} #{index}"
        );
    }
}

#[test]
fn test_cidr_set_randomish_allocation() {
    for cluster in ["127.123.234.0/16", "beef:1234::/16"] {
        let mut a = set(cluster, 24);
        let first: Vec<IpNet> = (0..256)
            .map(|_| a.allocate_next().expect("allocation"))
            .collect();
        assert_eq!(first.iter().collect::<HashSet<_>>().len(), 256);
        assert!(a.allocate_next().is_err());
        for cidr in &first {
            a.release(cidr).expect("release");
        }
        let second: Vec<IpNet> = (0..256)
            .map(|_| a.allocate_next().expect("allocation"))
            .collect();
        assert_eq!(
            first.iter().collect::<HashSet<_>>(),
            second.iter().collect::<HashSet<_>>()
        );
    }
}

#[test]
fn test_cidr_set_allocation_occupied() {
    let mut a = set("127.123.234.0/16", 24);
    // Occupy the upper half: only the lower half can be handed out, still round-robin.
    a.occupy(&net("127.123.128.0/17")).expect("occupy");
    let got: HashSet<IpNet> = (0..128)
        .map(|_| a.allocate_next().expect("allocation"))
        .collect();
    assert_eq!(got.len(), 128);
    assert!(got.iter().all(|c| net("127.123.0.0/17").contains(c)));
    assert!(a.allocate_next().is_err());
}

#[test]
fn allocation_is_round_robin_from_the_last_one() {
    let mut a = set("10.0.0.0/16", 24);
    assert_eq!(a.allocate_next().unwrap(), net("10.0.0.0/24"));
    assert_eq!(a.allocate_next().unwrap(), net("10.0.1.0/24"));
    a.release(&net("10.0.0.0/24")).unwrap();
    // A freed block is not handed out again before the others.
    assert_eq!(a.allocate_next().unwrap(), net("10.0.2.0/24"));
}

#[test]
fn test_get_bitfor_cidr() {
    for (name, cluster, mask, sub, expected) in [
        (
            "Get 0 Bit with IPv4",
            "127.0.0.0/8",
            16,
            "127.0.0.0/16",
            Some(0),
        ),
        ("Get 0 Bit with IPv6", "be00::/8", 16, "be00::/16", Some(0)),
        (
            "Get 1 Bit with IPv4",
            "127.0.0.0/8",
            16,
            "127.1.0.0/16",
            Some(1),
        ),
        ("Get 1 Bit with IPv6", "be00::/8", 16, "be01::/16", Some(1)),
        ("Get 2 Bit with IPv6", "be00::/8", 16, "be02::/16", Some(2)),
        (
            "Get 4 Bit with IPv4",
            "127.0.0.0/8",
            16,
            "127.4.0.0/16",
            Some(4),
        ),
        (
            "Get 255 Bit with IPv4",
            "127.0.0.0/8",
            16,
            "127.255.0.0/16",
            Some(255),
        ),
        (
            "Get error with IPv4",
            "127.0.0.0/8",
            16,
            "126.0.0.0/16",
            None,
        ),
        ("Get error with IPv6", "be00::/8", 16, "bf00::/16", None),
        (
            "Get error with other family",
            "127.0.0.0/8",
            16,
            "be00::/16",
            None,
        ),
    ] {
        let a = set(cluster, mask);
        let got = a.indices(&net(sub)).ok().map(|(begin, _)| begin);
        assert_eq!(got, expected, "{name}");
    }
}

#[test]
fn test_occupy() {
    for (name, cluster, mask, sub, begin, end) in [
        (
            "Occupy all with IPv4",
            "127.0.0.0/8",
            16,
            "127.0.0.0/8",
            0,
            255,
        ),
        (
            "Occupy all with IPv6",
            "2001:beef:1200::/40",
            48,
            "2001:beef:1200::/40",
            0,
            255,
        ),
        (
            "Occupy all when the CIDR is larger",
            "127.0.0.0/8",
            16,
            "127.0.0.0/2",
            0,
            255,
        ),
        (
            "Occupy first with IPv4",
            "127.0.0.0/8",
            16,
            "127.0.0.0/16",
            0,
            0,
        ),
        (
            "Occupy first with IPv6",
            "2001:beef:1200::/40",
            48,
            "2001:beef:1200::/48",
            0,
            0,
        ),
        (
            "Occupy smaller than a block",
            "127.0.0.0/8",
            16,
            "127.0.0.0/24",
            0,
            0,
        ),
        (
            "Occupy 127.0.0.0/15",
            "127.0.0.0/8",
            16,
            "127.0.0.0/15",
            0,
            1,
        ),
        (
            "Occupy 127.4.0.0/14",
            "127.0.0.0/8",
            16,
            "127.4.0.0/14",
            4,
            7,
        ),
        (
            "Occupy the last with IPv6",
            "2001:beef:1200::/40",
            48,
            "2001:beef:12ff::/48",
            255,
            255,
        ),
    ] {
        let mut a = set(cluster, mask);
        a.occupy(&net(sub)).expect(name);
        assert_eq!(used(&a), (begin..=end).collect::<Vec<_>>(), "{name}");
        assert_eq!(a.allocated(), end - begin + 1, "{name}");
    }
}

#[test]
fn occupy_out_of_range_or_foreign_is_harmless() {
    let mut a = set("10.0.0.0/16", 24);
    assert!(matches!(
        a.occupy(&net("10.1.0.0/24")),
        Err(CidrSetError::OutOfRange { .. })
    ));
    assert!(matches!(
        a.occupy(&net("fd00::/64")),
        Err(CidrSetError::OutOfRange { .. })
    ));
    assert!(a.occupy(&net("9.0.0.0/8")).is_err());
    assert_eq!(a.allocated(), 0);
}

#[test]
fn test_double_occupy_release() {
    // Upstream's "no double counting": occupying or releasing twice counts once.
    let metrics = SetMetrics::default();
    let mut a = CidrSet::new(net("10.10.0.0/16"), 24, metrics.clone()).unwrap();
    let cidr = net("10.10.1.0/24");
    a.occupy(&cidr).unwrap();
    a.occupy(&cidr).unwrap();
    assert_eq!(a.allocated(), 1);
    assert_eq!(metrics.allocations(), 1);
    a.occupy(&net("10.10.0.0/23")).unwrap();
    assert_eq!(a.allocated(), 2);
    assert_eq!(metrics.allocations(), 2);
    a.release(&cidr).unwrap();
    a.release(&cidr).unwrap();
    assert_eq!(a.allocated(), 1);
    assert_eq!(metrics.releases(), 1);
}

#[test]
fn test_cidr_set_metrics() {
    let metrics = SetMetrics::default();
    let mut a = CidrSet::new(net("10.0.0.0/16"), 24, metrics.clone()).unwrap();
    let mut taken = Vec::new();
    for i in 1..=256u32 {
        taken.push(a.allocate_next().unwrap());
        assert_eq!(metrics.allocations(), u64::from(i));
        assert!((metrics.usage() - f64::from(i) / 256.0).abs() < 1e-9);
    }
    assert!(a.allocate_next().is_err());
    for (i, cidr) in taken.iter().enumerate() {
        a.release(cidr).unwrap();
        assert_eq!(metrics.releases(), i as u64 + 1);
    }
    assert!(metrics.usage().abs() < 1e-9);
}

#[test]
fn new_checks_the_mask() {
    assert!(matches!(
        CidrSet::new(net("10.0.0.0/16"), 8, SetMetrics::default()),
        Err(CidrSetError::MaskTooShort { .. })
    ));
    // Upstream limits only IPv6; ours for IPv4 is 24 bits.
    assert!(CidrSet::new(net("10.0.0.0/8"), 25, SetMetrics::default()).is_ok());
    assert!(matches!(
        CidrSet::new(net("10.0.0.0/7"), 32, SetMetrics::default()),
        Err(CidrSetError::MaskTooLong { limit: 24, .. })
    ));
    assert!(matches!(
        CidrSet::new(net("fd00::/32"), 64, SetMetrics::default()),
        Err(CidrSetError::MaskTooLong { .. })
    ));
    assert!(matches!(
        CidrSet::new(net("10.0.0.0/24"), 33, SetMetrics::default()),
        Err(CidrSetError::MaskBeyondAddress { .. })
    ));
    // As large as the cluster CIDR: one block.
    let mut one = set("10.0.0.0/24", 24);
    assert_eq!(one.allocate_next().unwrap(), net("10.0.0.0/24"));
    assert!(one.allocate_next().is_err());
}
