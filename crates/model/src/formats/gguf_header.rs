//! A scan of a GGUF header's metadata for what candle's reader trusts
//! without checking: `general.alignment = 0` divides by zero inside it, a
//! key given twice is kept last by candle (so a check of the first would
//! pass a file candle then reads differently), and arrays nested without
//! bound overflow its recursive reader's stack. It reads keys and skips
//! values, allocating nothing sized by the file, and recurses at most
//! [`MAX_NESTING`] levels.

use std::io::{Read, Seek, SeekFrom};

const MAGIC: u32 = 0x4655_4747; // "GGUF", little-endian
const ALIGNMENT_KEY: &[u8; 17] = b"general.alignment";

/// Deepest nesting of arrays accepted. Real files nest one level (arrays
/// of strings or numbers); a crafted one 300,000 levels deep overflows the
/// stack of any recursive reader, candle's included.
pub const MAX_NESTING: usize = 16;

/// Why the scan stopped.
enum Stop {
    /// Reading failed or the header is malformed: the full reader says what.
    Unreadable,
    /// The header states something candle must not be given.
    Refused(String),
}

impl From<std::io::Error> for Stop {
    fn from(_: std::io::Error) -> Self {
        Self::Unreadable
    }
}

/// What in the header at `r` candle must not read, if anything; `r` is
/// left at its start. `Err` only for a failed seek; anything malformed is
/// left to the full reader to report.
pub(crate) fn refused_by_scan<R: Read + Seek>(r: &mut R) -> std::io::Result<Option<String>> {
    r.seek(SeekFrom::Start(0))?;
    let found = scan(r);
    r.seek(SeekFrom::Start(0))?;
    Ok(match found {
        Err(Stop::Refused(why)) => Some(why),
        Err(Stop::Unreadable) | Ok(()) => None,
    })
}

fn scan<R: Read + Seek>(r: &mut R) -> Result<(), Stop> {
    let magic = read_u32(r)?;
    let version = read_u32(r)?;
    if magic != MAGIC || version == 0 {
        return Ok(());
    }
    let wide = version >= 2;
    let count = |r: &mut R| -> std::io::Result<u64> {
        if wide {
            read_u64(r)
        } else {
            read_u32(r).map(u64::from)
        }
    };
    let _tensors = count(r)?;
    let pairs = count(r)?;
    let mut alignments = 0usize;
    for _ in 0..pairs {
        let key_len = count(r)?;
        let is_alignment = key_len == ALIGNMENT_KEY.len() as u64 && {
            let key: [u8; 17] = read_n(r)?;
            &key == ALIGNMENT_KEY
        };
        if key_len != ALIGNMENT_KEY.len() as u64 {
            let offset = i64::try_from(key_len)
                .map_err(|_| std::io::Error::other("key length past the file"))?;
            r.seek(SeekFrom::Current(offset))?;
        }
        let kind = read_u32(r)?;
        if is_alignment {
            alignments += 1;
            if alignments > 1 {
                return Err(Stop::Refused(
                    "general.alignment is given more than once".into(),
                ));
            }
            let alignment = match kind {
                0 | 1 => Some(read_n::<1>(r)?[0] as u64),
                2 | 3 => Some(u16::from_le_bytes(read_n(r)?) as u64),
                4 | 5 => Some(read_u32(r)? as u64),
                10 | 11 => Some(read_u64(r)?),
                _ => {
                    skip_value(r, kind, &count, 0)?;
                    None
                }
            };
            if alignment == Some(0) {
                return Err(Stop::Refused("general.alignment is 0".into()));
            }
            continue;
        }
        skip_value(r, kind, &count, 0)?;
    }
    Ok(())
}

/// Skips one metadata value of type `kind` (GGUF's numbering), found
/// inside `depth` arrays.
fn skip_value<R: Read + Seek>(
    r: &mut R,
    kind: u32,
    count: &impl Fn(&mut R) -> std::io::Result<u64>,
    depth: usize,
) -> Result<(), Stop> {
    let skip = |r: &mut R, n: u64| -> Result<(), Stop> {
        let offset =
            i64::try_from(n).map_err(|_| std::io::Error::other("a value past the file"))?;
        r.seek(SeekFrom::Current(offset))?;
        Ok(())
    };
    match kind {
        0 | 1 | 7 => skip(r, 1),
        2 | 3 => skip(r, 2),
        4..=6 => skip(r, 4),
        10..=12 => skip(r, 8),
        8 => {
            let n = count(r)?;
            skip(r, n)
        }
        9 => {
            if depth >= MAX_NESTING {
                return Err(Stop::Refused(format!(
                    "arrays nested more than {MAX_NESTING} levels deep"
                )));
            }
            let item = read_u32(r)?;
            let n = count(r)?;
            match item {
                0 | 1 | 7 => skip(r, n),
                2 | 3 => skip(r, n.saturating_mul(2)),
                4..=6 => skip(r, n.saturating_mul(4)),
                10..=12 => skip(r, n.saturating_mul(8)),
                _ => {
                    for _ in 0..n {
                        skip_value(r, item, count, depth + 1)?;
                    }
                    Ok(())
                }
            }
        }
        _ => Err(Stop::Unreadable),
    }
}

fn read_n<const N: usize>(r: &mut impl Read) -> std::io::Result<[u8; N]> {
    let mut b = [0u8; N];
    r.read_exact(&mut b)?;
    Ok(b)
}

fn read_u32(r: &mut impl Read) -> std::io::Result<u32> {
    read_n(r).map(u32::from_le_bytes)
}

fn read_u64(r: &mut impl Read) -> std::io::Result<u64> {
    read_n(r).map(u64::from_le_bytes)
}
