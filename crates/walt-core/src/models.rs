//! Node models and the compact compatibility form shown to users.

use std::collections::BTreeMap;

/// Splits a `walt.node.models` label value into models.
pub fn parse_models(label: &str) -> Vec<String> {
    label
        .split(',')
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .map(str::to_string)
        .collect()
}

/// Compact form of a model list: models sharing a family prefix (the part
/// before the first `-`) are grouped, e.g. `rpi-[3-b,4-b],pc-x86-64`.
/// Families keep the order of their first appearance.
pub fn compact_models(models: &[String]) -> String {
    let mut order: Vec<&str> = Vec::new();
    let mut groups: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for m in models {
        let (family, rest) = m.split_once('-').unwrap_or((m.as_str(), ""));
        let g = groups.entry(family).or_default();
        if g.is_empty() {
            order.push(family);
        }
        if !g.contains(&rest) {
            g.push(rest);
        }
    }
    order
        .iter()
        .map(|family| {
            let rests = &groups[family];
            match rests.as_slice() {
                [""] => family.to_string(),
                [one] => format!("{family}-{one}"),
                many => format!("{family}-[{}]", many.join(",")),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn compact() {
        assert_eq!(
            compact_models(&v(&["rpi-3-b", "rpi-4-b", "pc-x86-64"])),
            "rpi-[3-b,4-b],pc-x86-64"
        );
        assert_eq!(compact_models(&v(&["pc-x86-64"])), "pc-x86-64");
        assert_eq!(compact_models(&v(&["qemu"])), "qemu");
        assert_eq!(compact_models(&[]), "");
        assert_eq!(
            parse_models(" rpi-b, ,pc-x86-64"),
            v(&["rpi-b", "pc-x86-64"])
        );
    }
}
