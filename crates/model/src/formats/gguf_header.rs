//! A scan of a GGUF header's metadata for the values candle's reader trusts
//! without checking: `general.alignment = 0` divides by zero inside it.
//! It reads keys and skips values, allocating nothing sized by the file.

use std::io::{Read, Seek, SeekFrom};

const MAGIC: u32 = 0x4655_4747; // "GGUF", little-endian

/// `general.alignment` as the header in `r` states it, if it does; `r` is
/// left at its start. `Err` only for an I/O failure; anything malformed is
/// left to the full reader to report.
pub(crate) fn stated_alignment<R: Read + Seek>(r: &mut R) -> std::io::Result<Option<u64>> {
    r.seek(SeekFrom::Start(0))?;
    let found = scan(r);
    r.seek(SeekFrom::Start(0))?;
    // A truncated or garbled header is the full reader's to describe.
    Ok(found.unwrap_or(None))
}

fn scan<R: Read + Seek>(r: &mut R) -> std::io::Result<Option<u64>> {
    let magic = read_u32(r)?;
    let version = read_u32(r)?;
    if magic != MAGIC || version == 0 {
        return Ok(None);
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
    for _ in 0..pairs {
        let key_len = count(r)?;
        let is_alignment = key_len == "general.alignment".len() as u64 && {
            let mut key = [0u8; 17];
            r.read_exact(&mut key)?;
            &key == b"general.alignment"
        };
        if !is_alignment && key_len != "general.alignment".len() as u64 {
            r.seek(SeekFrom::Current(key_len as i64))?;
        }
        let kind = read_u32(r)?;
        if is_alignment {
            return Ok(match kind {
                0 | 1 => Some(read_n::<1>(r)?[0] as u64),
                2 | 3 => Some(u16::from_le_bytes(read_n(r)?) as u64),
                4 | 5 => Some(read_u32(r)? as u64),
                10 | 11 => Some(read_u64(r)?),
                _ => None,
            });
        }
        skip_value(r, kind, &count)?;
    }
    Ok(None)
}

/// Skips one metadata value of type `kind` (GGUF's numbering).
fn skip_value<R: Read + Seek>(
    r: &mut R,
    kind: u32,
    count: &impl Fn(&mut R) -> std::io::Result<u64>,
) -> std::io::Result<()> {
    let skip = |r: &mut R, n: u64| r.seek(SeekFrom::Current(n as i64)).map(|_| ());
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
            let item = read_u32(r)?;
            let n = count(r)?;
            match item {
                0 | 1 | 7 => skip(r, n),
                2 | 3 => skip(r, n.saturating_mul(2)),
                4..=6 => skip(r, n.saturating_mul(4)),
                10..=12 => skip(r, n.saturating_mul(8)),
                _ => {
                    for _ in 0..n {
                        skip_value(r, item, count)?;
                    }
                    Ok(())
                }
            }
        }
        _ => Err(std::io::Error::other("unknown metadata type")),
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
