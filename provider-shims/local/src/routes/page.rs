//! ListRoutes paging: pages of a listing sorted by destination, the token being the last
//! destination returned, so a caller reading every page sees each route once while nothing
//! changes (and a route added or removed between pages shifts nothing else).

use ipnet::IpNet;

use super::plan::PlanError;

/// Page size used when the caller asks for 0.
pub const DEFAULT_PAGE_SIZE: usize = 500;
/// Largest page served, whatever the caller asks.
pub const MAX_PAGE_SIZE: usize = 5000;

const TOKEN_PREFIX: &str = "after:";

/// The token continuing after `last`.
pub fn token_after(last: &IpNet) -> String {
    format!("{TOKEN_PREFIX}{last}")
}

/// The destination a token continues after; `None` for the first page.
pub fn parse_token(token: &str) -> Result<Option<IpNet>, PlanError> {
    if token.is_empty() {
        return Ok(None);
    }
    token
        .strip_prefix(TOKEN_PREFIX)
        .and_then(|rest| rest.parse::<IpNet>().ok())
        .map(Some)
        .ok_or_else(|| PlanError::Invalid {
            field: "page_token",
            message: format!(
                "{token:?} is not a token this shim returned (start again with an empty token)"
            ),
        })
}

/// The page of `sorted` (ascending by destination) after `token`, at most `page_size` long
/// (0: [`DEFAULT_PAGE_SIZE`]), and the token of the next page (empty on the last).
pub fn page<T>(
    sorted: Vec<(IpNet, T)>,
    page_size: u32,
    token: &str,
) -> Result<(Vec<T>, String), PlanError> {
    let after = parse_token(token)?;
    let size = match usize::try_from(page_size).unwrap_or(MAX_PAGE_SIZE) {
        0 => DEFAULT_PAGE_SIZE,
        n => n.min(MAX_PAGE_SIZE),
    };
    let mut rest = sorted
        .into_iter()
        .filter(|(destination, _)| after.is_none_or(|after| *destination > after))
        .peekable();
    let mut items = Vec::new();
    let mut last = None;
    while items.len() < size {
        let Some((destination, item)) = rest.next() else {
            break;
        };
        last = Some(destination);
        items.push(item);
    }
    let next = match (rest.peek(), last) {
        (Some(_), Some(last)) => token_after(&last),
        _ => String::new(),
    };
    Ok((items, next))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn listing(n: u8) -> Vec<(IpNet, u8)> {
        (0..n)
            .map(|i| (format!("10.244.{i}.0/24").parse().unwrap(), i))
            .collect()
    }

    #[test]
    fn pages_of_two_over_five_see_each_route_once() {
        let mut token = String::new();
        let mut seen = Vec::new();
        let mut pages = 0;
        loop {
            let (items, next) = page(listing(5), 2, &token).unwrap();
            assert!(items.len() <= 2);
            seen.extend(items);
            pages += 1;
            if next.is_empty() {
                break;
            }
            token = next;
        }
        assert_eq!(seen, vec![0, 1, 2, 3, 4]);
        assert_eq!(pages, 3);
    }

    #[test]
    fn an_exact_last_page_has_no_next_token() {
        let (items, next) = page(listing(4), 2, "").unwrap();
        assert_eq!(items, vec![0, 1]);
        let (items, next) = page(listing(4), 2, &next).unwrap();
        assert_eq!(items, vec![2, 3]);
        assert_eq!(next, "");
    }

    #[test]
    fn zero_page_size_takes_the_default() {
        let (items, next) = page(listing(7), 0, "").unwrap();
        assert_eq!(items.len(), 7);
        assert_eq!(next, "");
    }

    #[test]
    fn a_route_removed_between_pages_shifts_nothing() {
        let (_, next) = page(listing(5), 2, "").unwrap();
        let mut changed = listing(5);
        changed.remove(1);
        let (items, _) = page(changed, 2, &next).unwrap();
        assert_eq!(items, vec![2, 3]);
    }

    #[test]
    fn a_garbage_token_is_invalid() {
        let err = page(listing(3), 2, "xyz").unwrap_err();
        assert!(
            matches!(
                err,
                PlanError::Invalid {
                    field: "page_token",
                    ..
                }
            ),
            "{err}"
        );
        assert!(page(listing(3), 2, "after:10.0.0.0/99").is_err());
    }
}
