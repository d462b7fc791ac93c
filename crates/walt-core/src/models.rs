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

/// The models WalT nodes announce, and the OCI platforms their default
/// image is taken for from a multi-architecture index, in order of
/// preference. A variant of `None` also accepts an entry without variant.
pub const MODEL_PLATFORMS: &[(&str, &[Platform])] = &[
    ("rpi-b", &[ARM_V6]),
    ("rpi-b-plus", &[ARM_V6]),
    ("rpi-2-b", &[ARM_V7]),
    ("rpi-3-b", &[ARM64, ARM_V7]),
    ("rpi-3-b-plus", &[ARM64, ARM_V7]),
    ("rpi-4-b", &[ARM64, ARM_V7]),
    ("rpi-400", &[ARM64, ARM_V7]),
    ("rpi-5-b", &[ARM64, ARM_V7]),
    ("pc-x86-64", &[AMD64]),
    ("pc-x86-32", &[I386]),
    ("qemu-arm-32", &[ARM_V7]),
    ("qemu-arm-64", &[ARM64]),
];

/// An OCI platform (`linux/<architecture>[/<variant>]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Platform {
    pub architecture: &'static str,
    pub variant: Option<&'static str>,
}

const ARM_V6: Platform = Platform {
    architecture: "arm",
    variant: Some("v6"),
};
const ARM_V7: Platform = Platform {
    architecture: "arm",
    variant: Some("v7"),
};
const ARM64: Platform = Platform {
    architecture: "arm64",
    variant: None,
};
const AMD64: Platform = Platform {
    architecture: "amd64",
    variant: None,
};
const I386: Platform = Platform {
    architecture: "386",
    variant: None,
};

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "linux/{}", self.architecture)?;
        if let Some(v) = self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// Variants a `--platform` may name (Docker's arm `v5`-`v8`, amd64's `v2`-`v4`).
const VARIANTS: &[&str] = &["v2", "v3", "v4", "v5", "v6", "v7", "v8"];

impl Platform {
    /// Parses `linux/<architecture>[/<variant>]` (a Dockerfile's
    /// `FROM --platform=`), for an architecture walt knows
    /// ([`crate::arch::ARCHES`]), case-insensitively. As Docker normalises
    /// them, `linux/arm` is `linux/arm/v7` and `linux/arm64/v8` is
    /// `linux/arm64`. `None` for anything else.
    pub fn parse(text: &str) -> Option<Platform> {
        let text = text.to_ascii_lowercase();
        let mut parts = text.split('/');
        if parts.next()? != "linux" {
            return None;
        }
        let architecture = crate::arch::Arch::from_oci(parts.next()?)?.oci;
        let variant = match parts.next() {
            None => None,
            Some(v) => Some(*VARIANTS.iter().find(|k| **k == v)?),
        };
        if parts.next().is_some() {
            return None;
        }
        let variant = match (architecture, variant) {
            ("arm", None) => Some("v7"),
            ("arm64", Some("v8")) => None,
            (_, v) => v,
        };
        Some(Platform {
            architecture,
            variant,
        })
    }

    /// Whether an index entry of `architecture`/`variant` is this platform.
    /// `arm` without a variant counts as `v7` (Docker's default); `arm64`
    /// accepts `v8` or none.
    pub fn matches(&self, architecture: &str, variant: Option<&str>) -> bool {
        if architecture != self.architecture {
            return false;
        }
        match (self.architecture, self.variant, variant) {
            (_, None, None) => true,
            ("arm64", None, Some(v)) => v == "v8",
            (_, None, Some(_)) => false,
            ("arm", Some("v7"), None) => true,
            (_, Some(want), got) => got == Some(want),
        }
    }
}

/// The platforms a node of `model` boots, by preference; `None` for a
/// model walt does not know (its image is then taken for the server's
/// own platform).
pub fn model_platforms(model: &str) -> Option<&'static [Platform]> {
    MODEL_PLATFORMS
        .iter()
        .find(|(m, _)| *m == model)
        .map(|(_, p)| *p)
}

/// Longest model name accepted from a DHCP class.
pub const MAX_MODEL_LEN: usize = 64;

/// The model a device announces: the text after `walt.node.` in its user
/// class (checked first) or its vendor class. The user class may carry
/// RFC 3004 length prefixes (`\twalt.node.x`), which are skipped. A model
/// is `[a-z0-9._-]`, 1 to [`MAX_MODEL_LEN`] characters; anything else
/// announces no model.
pub fn model_from_classes(user_class: &str, vendor_class: &str) -> Option<String> {
    [user_class, vendor_class].iter().find_map(|class| {
        let start = class.find("walt.node.")?;
        let rest = &class[start + "walt.node.".len()..];
        let model: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            .collect::<String>()
            .to_ascii_lowercase();
        (!model.is_empty() && model.len() <= MAX_MODEL_LEN).then_some(model)
    })
}

/// MAC prefixes (OUIs) of the Raspberry Pi foundation.
pub const RPI_MAC_PREFIXES: &[&str] = &[
    "28:cd:c1", "2c:cf:67", "88:a2:9e", "b8:27:eb", "d8:3a:dd", "dc:a6:32", "e4:5f:01",
];

/// Normalises a MAC address to `aa:bb:cc:dd:ee:ff` (lower case, each byte
/// two digits; isc-dhcp-server's `binary-to-ascii` drops leading zeros).
/// `None` if it is not six bytes of hex separated by `:` or `-`.
pub fn normalize_mac(mac: &str) -> Option<String> {
    let parts: Vec<&str> = mac.trim().split([':', '-']).collect();
    if parts.len() != 6 {
        return None;
    }
    let mut out = Vec::with_capacity(6);
    for p in parts {
        if p.is_empty() || p.len() > 2 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        out.push(format!("{:0>2}", p.to_ascii_lowercase()));
    }
    Some(out.join(":"))
}

/// Whether a (normalised) MAC address is a Raspberry Pi's.
pub fn is_rpi_mac(mac: &str) -> bool {
    RPI_MAC_PREFIXES.iter().any(|p| mac.starts_with(p))
}

/// The last 6 hex digits of a (normalised) MAC address.
pub fn mac_suffix(mac: &str) -> String {
    let hex: String = mac.chars().filter(|c| *c != ':').collect();
    hex[hex.len().saturating_sub(6)..].to_string()
}

/// Longest device name.
pub const MAX_DEVICE_NAME_LEN: usize = 63;

/// Whether `name` is a valid device (node) name: a hostname label,
/// `[a-z0-9-]`, starting with a letter or digit, at most
/// [`MAX_DEVICE_NAME_LEN`] characters, not a node set keyword.
pub fn is_valid_device_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_DEVICE_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !matches!(name, "all" | "my-nodes" | "server" | "walt-server")
}

/// The name a new device gets: the hostname it sent, lower-cased, with
/// the MAC's last 6 hex digits appended (unless already there), else
/// `<model>-<6 hex digits>` (`unknown-<6 hex digits>` without model).
/// Characters a device name cannot hold become `-`.
pub fn default_device_name(hostname: &str, mac: &str, model: Option<&str>) -> String {
    let suffix = mac_suffix(mac);
    let clean = |s: &str| -> String {
        let s: String = s
            .to_ascii_lowercase()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        s.trim_matches('-').to_string()
    };
    let host = clean(hostname);
    let base = if !host.is_empty() {
        if host.ends_with(&suffix) {
            host
        } else {
            format!("{host}-{suffix}")
        }
    } else {
        format!("{}-{suffix}", clean(model.unwrap_or("unknown")))
    };
    // Long enough names are cut before the suffix, which identifies them.
    if base.len() > MAX_DEVICE_NAME_LEN {
        let keep = MAX_DEVICE_NAME_LEN - suffix.len() - 1;
        format!("{}-{suffix}", base[..keep].trim_end_matches('-'))
    } else {
        base
    }
}

/// The name of a model's default image: `waltplatform/<model>-default:latest`.
pub fn default_image_name(model: &str) -> crate::ImageName {
    crate::ImageName {
        owner: crate::DEFAULT_IMAGES_OWNER.to_string(),
        name: format!("{model}-default"),
        tag: "latest".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platforms_parse_as_docker_normalises_them() {
        let p = |s| Platform::parse(s).map(|p| p.to_string());
        assert_eq!(p("linux/arm64").as_deref(), Some("linux/arm64"));
        assert_eq!(p("linux/arm64/v8").as_deref(), Some("linux/arm64"));
        assert_eq!(p("Linux/ARM").as_deref(), Some("linux/arm/v7"));
        assert_eq!(p("linux/arm/v6").as_deref(), Some("linux/arm/v6"));
        assert_eq!(p("linux/386").as_deref(), Some("linux/386"));
        assert_eq!(p("linux/amd64").as_deref(), Some("linux/amd64"));
        for bad in [
            "",
            "linux",
            "windows/amd64",
            "linux/x86_64",
            "linux/arm/v9",
            "linux/arm/v7/x",
            "linux//v7",
        ] {
            assert_eq!(p(bad), None, "{bad}");
        }
        // what a parsed platform accepts is what the model table accepts
        let arm = Platform::parse("linux/arm").unwrap();
        assert!(arm.matches("arm", None) && arm.matches("arm", Some("v7")));
        assert!(!arm.matches("arm", Some("v6")));
    }

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

    #[test]
    fn classes() {
        assert_eq!(
            model_from_classes("\twalt.node", "walt.node.pc-x86-64").as_deref(),
            Some("pc-x86-64")
        );
        assert_eq!(
            model_from_classes("\u{10}walt.node.rpi-4-b", "walt.node.pc-x86-64").as_deref(),
            Some("rpi-4-b")
        );
        assert_eq!(model_from_classes("iPXE", "udhcp 1.35.0"), None);
        assert_eq!(model_from_classes("", "walt.node."), None);
        assert_eq!(
            model_from_classes("", "walt.node.a;rm -rf /").as_deref(),
            Some("a")
        );
    }

    #[test]
    fn macs_and_names() {
        assert_eq!(
            normalize_mac("B8:27:EB:1:2:3").as_deref(),
            Some("b8:27:eb:01:02:03")
        );
        assert_eq!(
            normalize_mac("b8-27-eb-01-02-03").as_deref(),
            Some("b8:27:eb:01:02:03")
        );
        assert_eq!(normalize_mac("b8:27:eb:01:02"), None);
        assert_eq!(normalize_mac("b8:27:eb:01:02:zz"), None);
        assert!(is_rpi_mac("b8:27:eb:01:02:03"));
        assert!(!is_rpi_mac("52:54:00:12:34:56"));
        let mac = "52:54:00:12:34:56";
        assert_eq!(
            default_device_name("nodeA", mac, Some("pc-x86-64")),
            "nodea-123456"
        );
        assert_eq!(default_device_name("x-123456", mac, None), "x-123456");
        assert_eq!(
            default_device_name("", mac, Some("pc-x86-64")),
            "pc-x86-64-123456"
        );
        assert_eq!(default_device_name("", mac, None), "unknown-123456");
        assert_eq!(default_device_name("a b_c", mac, None), "a-b-c-123456");
        let long = default_device_name(&"h".repeat(100), mac, None);
        assert!(long.len() <= MAX_DEVICE_NAME_LEN && long.ends_with("-123456"));
        assert!(is_valid_device_name("nodea-123456"));
        assert!(!is_valid_device_name("all"));
        assert!(!is_valid_device_name("Node"));
        assert!(!is_valid_device_name("a/b"));
    }

    #[test]
    fn platforms() {
        let rpi_b = model_platforms("rpi-b").unwrap();
        assert!(rpi_b[0].matches("arm", Some("v6")));
        assert!(!rpi_b[0].matches("arm", Some("v7")));
        assert!(!rpi_b[0].matches("arm", None));
        let rpi4 = model_platforms("rpi-4-b").unwrap();
        assert!(rpi4[0].matches("arm64", Some("v8")) && rpi4[0].matches("arm64", None));
        assert!(rpi4[1].matches("arm", None));
        assert!(model_platforms("pc-x86-32").unwrap()[0].matches("386", None));
        assert_eq!(model_platforms("toaster"), None);
        assert_eq!(rpi_b[0].to_string(), "linux/arm/v6");
        assert_eq!(
            default_image_name("rpi-b").to_string(),
            "waltplatform/rpi-b-default"
        );
    }
}
