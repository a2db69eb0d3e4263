//! Kernel randomness, fetched in blocks, for the random bytes that are not key material.
//!
//! Owns: where serial numbers, lease ids and refresh jitter get their randomness. Each X.509
//! SVID needed three `getrandom` syscalls for them (0.5 µs each here: this glibc has no vDSO
//! `getrandom`); a per-thread block of kernel bytes turns them into copies. The bytes are the
//! kernel CSPRNG's own, each handed out once and then wiped. Keys and signature nonces still
//! come from ring, which asks the kernel directly.

use std::cell::RefCell;

use ring::rand::{SecureRandom, SystemRandom};

/// Bytes fetched per syscall: ~12 SVIDs' worth.
const BLOCK: usize = 512;

struct Block {
    bytes: [u8; BLOCK],
    /// Bytes already handed out (and wiped) from the front.
    used: usize,
}

thread_local! {
    static BLOCK_OF_THREAD: RefCell<Block> = const {
        RefCell::new(Block { bytes: [0; BLOCK], used: BLOCK })
    };
}

/// Fills `out` with kernel randomness. Fails only if the kernel's source does.
pub fn fill(out: &mut [u8]) -> Result<(), ring::error::Unspecified> {
    if out.len() > BLOCK / 4 {
        return SystemRandom::new().fill(out);
    }
    BLOCK_OF_THREAD.with_borrow_mut(|b| {
        if BLOCK - b.used < out.len() {
            SystemRandom::new().fill(&mut b.bytes)?;
            b.used = 0;
        }
        let taken = &mut b.bytes[b.used..b.used + out.len()];
        out.copy_from_slice(taken);
        // A later read of this thread's memory must not reveal what was handed out.
        taken.fill(0);
        b.used += out.len();
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hands_out_each_byte_once_across_refills() {
        // 16-byte draws across several refills: none repeats (a repeat of 128 random bits
        // would mean a byte was handed out twice or a block was not refilled).
        let mut seen = std::collections::HashSet::new();
        for _ in 0..(BLOCK / 16) * 5 + 3 {
            let mut v = [0u8; 16];
            fill(&mut v).unwrap();
            assert!(seen.insert(v), "a 16-byte draw repeated");
        }
    }

    #[test]
    fn uneven_and_large_draws_are_filled() {
        let mut odd = [0u8; 13];
        for _ in 0..100 {
            fill(&mut odd).unwrap();
        }
        // Bigger than a draw from the block: straight from the kernel.
        let mut big = [0u8; BLOCK];
        fill(&mut big).unwrap();
        assert!(big.iter().any(|b| *b != 0));
        let mut empty = [0u8; 0];
        fill(&mut empty).unwrap();
    }
}
