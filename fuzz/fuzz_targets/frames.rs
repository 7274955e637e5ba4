//! Frame splitting as a session does it: arbitrary bytes from a socket, cut into frames with
//! `decode_frame_header`, each first byte typed with `packet_type`.
//!
//! Checked for several maximum frame sizes: no panic; every loop makes progress (so it ends);
//! a frame is never longer than the maximum; the header is the minimal encoding of its length;
//! and the frames found do not depend on how the bytes arrive (all at once or a few at a time).

#![no_main]

use std::ops::Range;

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use mqtt_warden::codec::{
    decode_frame_header, packet_type, put_varint, CodecError, PacketType, ProtocolVersion,
    MAX_VARIABLE_BYTE_INTEGER,
};

/// The limits a session may run with: tiny, small, the usual, and the largest MQTT allows.
const MAX_FRAME_SIZES: [usize; 5] = [2, 5, 128, 4096, MAX_VARIABLE_BYTE_INTEGER + 5];

/// How the split ended: bytes left waiting for more, or the error that closes the session.
#[derive(Debug, Clone, PartialEq)]
enum End {
    NeedMore,
    Error(CodecError),
}

/// Splits `stream` delivered in reads of `chunk` bytes. Returns each frame as its first byte and
/// its place in the stream, and how it ended. The read buffer is `stream[start..fed]`: what
/// arrived and is not yet taken as a frame.
fn split(
    stream: &[u8],
    max: usize,
    chunk: usize,
    scratch: &mut BytesMut,
) -> (Vec<(u8, Range<usize>)>, End) {
    let mut frames = Vec::new();
    let mut start = 0;
    let mut fed = 0;
    // Each pass either takes a frame (at least 2 bytes) or reads at least one byte, so the loop
    // runs at most twice the input length, plus the final pass.
    let mut passes = 0;
    loop {
        passes += 1;
        assert!(
            passes <= 2 * stream.len() + 2,
            "frame loop does not progress"
        );
        let buf = &stream[start..fed];
        match decode_frame_header(buf, max) {
            Err(error) => {
                if let CodecError::TooLarge { declared, max: m } = error {
                    assert_eq!(m, max);
                    assert!(declared > max);
                }
                return (frames, End::Error(error));
            }
            Ok(Some(header)) => {
                let len = header.frame_len();
                assert!(len <= max, "frame of {len} bytes over the maximum {max}");
                assert!((2..=5).contains(&header.header_len));
                assert!(header.remaining_len <= MAX_VARIABLE_BYTE_INTEGER);
                assert_eq!(header.first_byte, buf[0]);
                if buf.len() >= len {
                    // The header is the minimal encoding of its length (what put_varint writes).
                    scratch.clear();
                    put_varint(scratch, header.remaining_len);
                    assert_eq!(&buf[1..header.header_len], &scratch[..]);
                    frames.push((header.first_byte, start + header.header_len..start + len));
                    start += len;
                    continue;
                }
                // The header is complete and says how much is missing: read until it is there (in
                // whole reads), as a session waits for the rest without decoding again.
                if fed < stream.len() {
                    let missing = start + len - fed;
                    fed = (fed + missing.div_ceil(chunk) * chunk).min(stream.len());
                    continue;
                }
            }
            Ok(None) => {
                // More bytes are needed only while the length is still open: fewer than 5 header
                // bytes, every length byte so far with its continuation bit.
                assert!(buf.len() < 5, "needs more bytes after a complete header");
                assert!(buf.iter().skip(1).all(|b| b & 0x80 != 0));
            }
        }
        if fed == stream.len() {
            return (frames, End::NeedMore);
        }
        fed = (fed + chunk).min(stream.len());
    }
}

fuzz_target!(|data: &[u8]| {
    // One buffer for the expected headers: an allocation per frame would dominate the run.
    let mut scratch = BytesMut::with_capacity(8);
    for max in MAX_FRAME_SIZES {
        let (frames, end) = split(data, max, data.len().max(1), &mut scratch);
        for chunk in [1, 3] {
            assert_eq!(
                split(data, max, chunk, &mut scratch),
                (frames.clone(), end.clone()),
                "frames depend on read sizes"
            );
        }
        for (first_byte, _) in &frames {
            let v5 = packet_type(*first_byte, ProtocolVersion::V5);
            for version in [ProtocolVersion::V31, ProtocolVersion::V311] {
                let v3 = packet_type(*first_byte, version);
                if first_byte >> 4 == 15 {
                    assert!(v3.is_err(), "AUTH before MQTT 5");
                } else {
                    assert_eq!(v3, v5, "versions disagree on {first_byte:#04x}");
                }
            }
            if let Ok(kind) = v5 {
                assert_eq!(kind as u8, first_byte >> 4);
                let flags = first_byte & 0x0F;
                match kind {
                    PacketType::Publish => {}
                    PacketType::Pubrel | PacketType::Subscribe | PacketType::Unsubscribe => {
                        assert_eq!(flags, 0b0010)
                    }
                    _ => assert_eq!(flags, 0),
                }
            }
        }
    }
});
