//! The body of a gzip member: ISA-L's inflate with the `isal` feature, on by
//! default (about twice as fast as zlib's on layer data; it also reads and
//! checks the member trailer, CRC-32 included, at little cost), zlib-rs's
//! raw inflate otherwise (the trailer is then read by `GzipReader`).

use std::io;

use flate2::{Decompress, FlushDecompress, Status};

/// One step of raw inflate.
pub(crate) struct Step {
    pub used: usize,
    pub produced: usize,
    /// The end of the deflate stream was reached and all of it written
    /// (with `reads_trailer`, the gzip trailer after it read and checked).
    pub finished: bool,
}

/// A raw deflate decompressor.
pub(crate) enum Inflater {
    Zlib(Box<Decompress>),
    #[cfg(feature = "isal")]
    Isal(isal::Isal),
}

impl Inflater {
    /// The fastest one this build has.
    pub(crate) fn new() -> Self {
        #[cfg(feature = "isal")]
        if let Some(i) = isal::Isal::new() {
            return Inflater::Isal(i);
        }
        Self::zlib()
    }

    pub(crate) fn zlib() -> Self {
        Inflater::Zlib(Box::new(Decompress::new(false)))
    }

    /// Whether this inflater reads and verifies the gzip member trailer
    /// (CRC-32 and size) itself.
    pub(crate) fn reads_trailer(&self) -> bool {
        match self {
            Inflater::Zlib(_) => false,
            #[cfg(feature = "isal")]
            Inflater::Isal(_) => true,
        }
    }

    /// Ready for a new deflate stream.
    pub(crate) fn reset(&mut self) {
        match self {
            Inflater::Zlib(d) => d.reset(false),
            #[cfg(feature = "isal")]
            Inflater::Isal(i) => i.reset(),
        }
    }

    pub(crate) fn inflate(&mut self, input: &[u8], out: &mut [u8]) -> io::Result<Step> {
        match self {
            Inflater::Zlib(d) => {
                let (in0, out0) = (d.total_in(), d.total_out());
                let status = d
                    .decompress(input, out, FlushDecompress::None)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                Ok(Step {
                    used: (d.total_in() - in0) as usize,
                    produced: (d.total_out() - out0) as usize,
                    finished: status == Status::StreamEnd,
                })
            }
            #[cfg(feature = "isal")]
            Inflater::Isal(i) => i.inflate(input, out),
        }
    }
}

#[cfg(feature = "isal")]
mod isal {
    use std::ffi::{c_int, c_void};
    use std::io;
    use std::ptr::NonNull;

    use super::Step;

    unsafe extern "C" {
        fn walt_isal_new() -> *mut c_void;
        fn walt_isal_free(s: *mut c_void);
        fn walt_isal_reset(s: *mut c_void);
        fn walt_isal_inflate(
            s: *mut c_void,
            input: *const u8,
            in_len: u32,
            out: *mut u8,
            out_len: u32,
            used: *mut u32,
            produced: *mut u32,
            finished: *mut c_int,
        ) -> c_int;
    }

    /// An ISA-L inflate state (owned, heap-allocated by the C layer).
    pub(crate) struct Isal(NonNull<c_void>);

    // SAFETY: the state is only ever used through `&mut self`, from one
    // thread at a time; ISA-L keeps no thread-local or global state.
    unsafe impl Send for Isal {}

    impl Isal {
        pub(crate) fn new() -> Option<Self> {
            // SAFETY: allocates and initialises a state, or returns null.
            NonNull::new(unsafe { walt_isal_new() }).map(Isal)
        }

        pub(crate) fn reset(&mut self) {
            // SAFETY: a valid state we own.
            unsafe { walt_isal_reset(self.0.as_ptr()) }
        }

        pub(crate) fn inflate(&mut self, input: &[u8], out: &mut [u8]) -> io::Result<Step> {
            // Lengths are u32 in ISA-L: hand it at most 1 GiB at a time.
            let input = &input[..input.len().min(1 << 30)];
            let out_len = out.len().min(1 << 30);
            let (mut used, mut produced, mut finished) = (0u32, 0u32, 0 as c_int);
            // SAFETY: a valid state we own; the pointers and lengths describe
            // live slices for the duration of the call, and ISA-L keeps no
            // pointer to them after it returns (it copies what it keeps).
            let r = unsafe {
                walt_isal_inflate(
                    self.0.as_ptr(),
                    input.as_ptr(),
                    input.len() as u32,
                    out.as_mut_ptr(),
                    out_len as u32,
                    &mut used,
                    &mut produced,
                    &mut finished,
                )
            };
            if r < 0 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    if r == -6 {
                        "CRC-32 mismatch or wrong size in a member trailer".to_string()
                    } else {
                        format!("corrupt deflate data (ISA-L error {r})")
                    },
                ));
            }
            Ok(Step {
                used: used as usize,
                produced: produced as usize,
                finished: finished != 0,
            })
        }
    }

    impl Drop for Isal {
        fn drop(&mut self) {
            // SAFETY: a valid state we own, freed once.
            unsafe { walt_isal_free(self.0.as_ptr()) }
        }
    }
}
