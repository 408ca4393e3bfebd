//! A deterministic mutation fuzzer for the stable driver: a seeded PRNG picks a seed file and
//! applies a few mutations (bit flips, interesting bytes, inserts, deletes, truncation, splicing
//! two seeds, repeated chunks, huge values over length-like fields). No coverage feedback: this
//! is a regression net for CI, the long coverage-guided runs are cargo-fuzz's.
//! The same `(seeds, rng seed)` always gives the same inputs, so a failure replays.

/// splitmix64: small, fast, and good enough to pick mutations.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
}

const INTERESTING_BYTES: [u8; 4] = [0, 0xff, 0x7f, 0x80];

/// Values that break length and offset arithmetic, in every width.
const HUGE: [u64; 10] =
    [0, 1, 0x7f, 0xff, 0x7fff_ffff, 0x8000_0000, 0xffff_ffff, 0x7fff_ffff_ffff_ffff, 0x8000_0000_0000_0000, u64::MAX];

/// Bytes of the input no longer than this are kept (mutations never grow one past it).
pub const MAX_LEN: usize = 256 * 1024;

/// One input: a seed with 1 to 8 mutations applied.
pub fn mutate(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut data = if seeds.is_empty() { Vec::new() } else { seeds[rng.below(seeds.len())].clone() };
    let rounds = 1 + rng.below(8);
    for _ in 0..rounds {
        mutate_once(rng, &mut data, seeds);
    }
    data.truncate(MAX_LEN);
    data
}

fn mutate_once(rng: &mut Rng, data: &mut Vec<u8>, seeds: &[Vec<u8>]) {
    let len = data.len();
    match rng.below(10) {
        // Flip a bit.
        0 if len > 0 => {
            let i = rng.below(len);
            data[i] ^= 1 << rng.below(8);
        }
        // Set a byte to an interesting value.
        1 if len > 0 => {
            let i = rng.below(len);
            data[i] = INTERESTING_BYTES[rng.below(INTERESTING_BYTES.len())];
        }
        // A random byte.
        2 if len > 0 => {
            let i = rng.below(len);
            data[i] = rng.next_u64() as u8;
        }
        // Insert a few bytes (random or interesting).
        3 => {
            let at = rng.below(len + 1);
            let n = 1 + rng.below(16);
            let bytes: Vec<u8> = (0..n)
                .map(|_| if rng.chance(2) { INTERESTING_BYTES[rng.below(4)] } else { rng.next_u64() as u8 })
                .collect();
            data.splice(at..at, bytes);
        }
        // Delete a range.
        4 if len > 0 => {
            let at = rng.below(len);
            let n = 1 + rng.below((len - at).min(64));
            data.drain(at..at + n);
        }
        // Truncate.
        5 if len > 0 => {
            let keep = rng.below(len);
            data.truncate(keep);
        }
        // Splice: the head of this input and the tail of another seed.
        6 if !seeds.is_empty() => {
            let other = &seeds[rng.below(seeds.len())];
            let cut = rng.below(len + 1);
            let from = rng.below(other.len() + 1);
            data.truncate(cut);
            data.extend_from_slice(&other[from..]);
        }
        // Repeat a chunk several times.
        7 if len > 0 => {
            let at = rng.below(len);
            let n = 1 + rng.below((len - at).min(256));
            let most = if rng.chance(4) { 256 } else { 8 };
            let times = 1 + rng.below(most);
            let chunk = data[at..at + n].to_vec();
            let mut rep = Vec::with_capacity(n * times);
            for _ in 0..times {
                rep.extend_from_slice(&chunk);
            }
            data.splice(at..at, rep);
        }
        // A huge value over a length-like field: 1, 2, 4 or 8 bytes, either byte order.
        8 if len > 0 => {
            let width = [1usize, 2, 4, 8][rng.below(4)];
            let at = rng.below(len);
            let v = HUGE[rng.below(HUGE.len())];
            let bytes = if rng.chance(2) { v.to_le_bytes() } else { v.to_be_bytes() };
            let bytes = if bytes[0] == 0 && width < 8 { &bytes[8 - width..] } else { &bytes[..width] };
            for (k, b) in bytes.iter().enumerate() {
                if let Some(slot) = data.get_mut(at + k) {
                    *slot = *b;
                }
            }
        }
        // Change an ASCII number in place (text formats: TOML, JSON, pickle's INT).
        _ => {
            let digits: Vec<usize> =
                data.iter().enumerate().filter(|(_, b)| b.is_ascii_digit()).map(|(i, _)| i).collect();
            if digits.is_empty() {
                if len > 0 {
                    let i = rng.below(len);
                    data[i] = data[i].wrapping_add(1 + rng.below(3) as u8);
                }
                return;
            }
            let i = digits[rng.below(digits.len())];
            let replacement: &[u8] = match rng.below(5) {
                0 => b"0",
                1 => b"-1",
                2 => b"4294967296",
                3 => b"18446744073709551615",
                _ => b"99999999999999999999999",
            };
            let mut end = i;
            while end < len && data[end].is_ascii_digit() {
                end += 1;
            }
            data.splice(i..end, replacement.iter().copied());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_inputs() {
        let seeds = vec![b"hello 123 world".to_vec(), vec![0u8; 40]];
        let run = |s| {
            let mut rng = Rng::new(s);
            (0..200).map(|_| mutate(&mut rng, &seeds)).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        let inputs = run(7);
        assert!(inputs.iter().any(|i| i.len() > 40), "some inputs grow");
        assert!(inputs.iter().any(|i| i.len() < 15), "some shrink");
        assert!(inputs.iter().all(|i| i.len() <= MAX_LEN));
    }

    #[test]
    fn parts_and_join_are_inverse() {
        let files: [&[u8]; 3] = [b"{\"a\":1}", b"", b"tar bytes"];
        let joined = crate::join(&files);
        assert_eq!(crate::parts(&joined, 3), files.to_vec());
        assert_eq!(crate::parts(b"only one", 2), vec![&b"only one"[..], &b""[..]]);
    }
}
