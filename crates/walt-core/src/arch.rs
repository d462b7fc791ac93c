//! CPU architectures: one table of the names each side gives the same CPU
//! (OCI platforms, `uname -m` / Rust's `std::env::consts::ARCH`, qemu-user).

/// One CPU architecture under every name walt meets it by.
#[derive(Debug, PartialEq, Eq)]
pub struct Arch {
    /// OCI `architecture` (Go's `GOARCH`): `amd64`, `arm64`...
    pub oci: &'static str,
    /// OCI `variant` a host of this architecture asks for first in an index.
    pub variant: Option<&'static str>,
    /// Machine names: `uname -m` and Rust's `std::env::consts::ARCH` spellings.
    pub machines: &'static [&'static str],
    /// qemu-user name: the emulator is `qemu-<qemu>`, and so is its binfmt_misc handler.
    pub qemu: &'static str,
    /// OCI architectures a host of this one runs natively besides its own. (arm64 runs
    /// 32-bit arm code only when the CPU has aarch32, which is not guaranteed: not listed.)
    pub also_runs: &'static [&'static str],
}

/// Every architecture walt knows; an OCI name, a machine name or a qemu name appears once.
pub const ARCHES: &[Arch] = &[
    Arch {
        oci: "amd64",
        variant: None,
        machines: &["x86_64"],
        qemu: "x86_64",
        also_runs: &["386"],
    },
    Arch {
        oci: "386",
        variant: None,
        machines: &["x86", "i686", "i386"],
        qemu: "i386",
        also_runs: &[],
    },
    Arch {
        oci: "arm64",
        variant: Some("v8"),
        machines: &["aarch64"],
        qemu: "aarch64",
        also_runs: &[],
    },
    Arch {
        oci: "arm",
        variant: Some("v7"),
        machines: &["arm", "armv7l"],
        qemu: "arm",
        also_runs: &[],
    },
    Arch {
        oci: "ppc64le",
        variant: None,
        machines: &["ppc64le"],
        qemu: "ppc64le",
        also_runs: &[],
    },
    Arch {
        oci: "s390x",
        variant: None,
        machines: &["s390x"],
        qemu: "s390x",
        also_runs: &[],
    },
    Arch {
        oci: "riscv64",
        variant: None,
        machines: &["riscv64"],
        qemu: "riscv64",
        also_runs: &[],
    },
    Arch {
        oci: "mips64le",
        variant: None,
        machines: &["mips64el"],
        qemu: "mips64el",
        also_runs: &[],
    },
];

impl Arch {
    /// The architecture of a machine name (`uname -m` or `std::env::consts::ARCH`).
    /// Rust names both endiannesses of `powerpc64` and `mips64` alike: as they only
    /// come from `std::env::consts::ARCH`, they are read with this build's endianness.
    pub fn from_machine(machine: &str) -> Option<&'static Arch> {
        let machine = match machine {
            "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
            "mips64" if cfg!(target_endian = "little") => "mips64el",
            m => m,
        };
        ARCHES.iter().find(|a| a.machines.contains(&machine))
    }

    /// The architecture of an OCI `architecture` name.
    pub fn from_oci(oci: &str) -> Option<&'static Arch> {
        ARCHES.iter().find(|a| a.oci == oci)
    }

    /// The architecture this program was built for, when walt knows it.
    pub fn host() -> Option<&'static Arch> {
        Self::from_machine(std::env::consts::ARCH)
    }

    /// Does a host of this architecture run `image_oci` code without emulation?
    pub fn runs_natively(&self, image_oci: &str) -> bool {
        self.oci == image_oci || self.also_runs.contains(&image_oci)
    }

    /// The binfmt_misc handler (and emulator binary) name: `qemu-aarch64`...
    pub fn qemu_handler(&self) -> String {
        format!("qemu-{}", self.qemu)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique() {
        let mut oci: Vec<_> = ARCHES.iter().map(|a| a.oci).collect();
        let mut machines: Vec<_> = ARCHES.iter().flat_map(|a| a.machines).collect();
        let mut qemu: Vec<_> = ARCHES.iter().map(|a| a.qemu).collect();
        for v in [&mut oci, &mut qemu] {
            let n = v.len();
            v.sort();
            v.dedup();
            assert_eq!(v.len(), n, "{v:?}");
        }
        let n = machines.len();
        machines.sort();
        machines.dedup();
        assert_eq!(machines.len(), n, "{machines:?}");
        for a in ARCHES {
            for other in a.also_runs {
                assert!(Arch::from_oci(other).is_some(), "{other}");
            }
        }
    }

    #[test]
    fn every_name_leads_back_to_its_arch() {
        for a in ARCHES {
            assert_eq!(Arch::from_oci(a.oci), Some(a));
            for m in a.machines {
                assert_eq!(Arch::from_machine(m), Some(a), "{m}");
            }
        }
    }

    #[test]
    fn machine_names() {
        let oci = |m| Arch::from_machine(m).map(|a| (a.oci, a.variant));
        assert_eq!(oci("x86_64"), Some(("amd64", None)));
        assert_eq!(oci("aarch64"), Some(("arm64", Some("v8"))));
        assert_eq!(oci("arm"), Some(("arm", Some("v7"))));
        assert_eq!(oci("armv7l"), Some(("arm", Some("v7"))));
        for m in ["x86", "i686", "i386"] {
            assert_eq!(oci(m), Some(("386", None)), "{m}");
        }
        assert_eq!(oci("riscv64"), Some(("riscv64", None)));
        assert_eq!(oci("s390x"), Some(("s390x", None)));
        assert_eq!(oci("ppc64le"), Some(("ppc64le", None)));
        assert_eq!(oci("loongarch64"), None);
        assert_eq!(oci(""), None);
        // Rust's endianness-free names take this build's endianness.
        let le = cfg!(target_endian = "little");
        assert_eq!(
            oci("powerpc64"),
            le.then_some(("ppc64le", None)),
            "powerpc64"
        );
        assert_eq!(oci("mips64"), le.then_some(("mips64le", None)), "mips64");
    }

    #[test]
    fn qemu_names() {
        let q = |o| Arch::from_oci(o).map(Arch::qemu_handler);
        assert_eq!(q("amd64").as_deref(), Some("qemu-x86_64"));
        assert_eq!(q("386").as_deref(), Some("qemu-i386"));
        assert_eq!(q("arm64").as_deref(), Some("qemu-aarch64"));
        assert_eq!(q("arm").as_deref(), Some("qemu-arm"));
        assert_eq!(q("ppc64le").as_deref(), Some("qemu-ppc64le"));
        assert_eq!(q("mips64le").as_deref(), Some("qemu-mips64el"));
        assert_eq!(q("riscv64").as_deref(), Some("qemu-riscv64"));
        assert_eq!(q("s390x").as_deref(), Some("qemu-s390x"));
        assert_eq!(q("wasm"), None);
    }

    #[test]
    fn native_siblings() {
        let amd64 = Arch::from_oci("amd64").unwrap();
        assert!(amd64.runs_natively("amd64"));
        assert!(amd64.runs_natively("386"));
        assert!(!amd64.runs_natively("arm64"));
        let arm64 = Arch::from_oci("arm64").unwrap();
        assert!(arm64.runs_natively("arm64"));
        assert!(!arm64.runs_natively("arm"));
        assert!(!Arch::from_oci("386").unwrap().runs_natively("amd64"));
    }

    #[test]
    fn this_host_is_known() {
        let want = if cfg!(target_arch = "x86_64") {
            "amd64"
        } else if cfg!(target_arch = "aarch64") {
            "arm64"
        } else {
            return;
        };
        assert_eq!(Arch::host().map(|a| a.oci), Some(want));
    }
}
