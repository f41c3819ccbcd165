//! Scrubbing a WebSocket stream from the upstream, frame by frame.
//!
//! Scrubbing the raw bytes would miss a secret that an upstream splits
//! across the fragments of one message: the frame headers between the
//! pieces break the match, and the agent joins the pieces back together.
//! So the payloads of a message's data frames run through one masking
//! stream (matches become `*` of the same length, which keeps every frame's
//! length valid), and each frame header goes out once all the payload before
//! it has been released: a fragment that ends in what could be the start of
//! a secret waits for the bytes that settle it. A message's last frame
//! flushes the stream, so a whole message is never held back. Control
//! frames (ping, pong, close), which may come between fragments, are
//! scrubbed whole and keep their place in the order.

use std::collections::VecDeque;

use bytes::Bytes;

use super::{ScrubStream, Scrubber};

/// The upstream broke the framing sidekey must read to scrub.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// RFC 6455 §5.1: a server never masks; the client must close. Masked
    /// bytes would also hide a secret from the scrubber.
    #[error("the upstream sent a masked WebSocket frame")]
    Masked,
    #[error("the upstream sent a WebSocket control frame longer than 125 bytes")]
    LongControl,
    /// RSV bits mean an extension (permessage-deflate): compressed
    /// payloads would hide a secret, and sidekey negotiates none.
    #[error("the upstream sent a WebSocket frame using an extension")]
    Extension,
    /// Frames queued behind a fragment's undecided tail, past [`MAX_WAITING`].
    #[error("the upstream sent too many WebSocket frames behind an unfinished fragment")]
    Backlog,
    #[error("the upstream sent a WebSocket frame longer than 2^63 bytes")]
    TooLong,
}

/// Scrubbing state for the upstream's side of one WebSocket connection.
#[derive(Debug)]
pub struct FrameScrubber {
    /// The payload of the message being read, across its fragments.
    message: ScrubStream,
    /// The bytes of a header not yet complete.
    header: Vec<u8>,
    /// The frame whose payload is being read.
    reading: Reading,
    /// What is read and not yet sent, in order.
    waiting: VecDeque<Waiting>,
    /// Payload bytes still to send for the data frame whose header went last.
    writing: u64,
}

#[derive(Debug)]
enum Reading {
    /// Between frames.
    Nothing,
    Data {
        remaining: u64,
        fin: bool,
    },
    /// A control frame is gathered whole, up to 125 bytes.
    Control {
        remaining: u64,
        header: Vec<u8>,
        payload: Vec<u8>,
    },
}

#[derive(Debug)]
enum Waiting {
    /// A data frame's header; its payload comes out of the message stream.
    Data { header: Vec<u8>, length: u64 },
    /// A control frame, scrubbed, header included.
    Whole(Vec<u8>),
}

impl Default for FrameScrubber {
    fn default() -> Self {
        Self {
            message: ScrubStream::masking(),
            header: Vec::with_capacity(MAX_HEADER),
            reading: Reading::Nothing,
            waiting: VecDeque::new(),
            writing: 0,
        }
    }
}

/// 2 bytes, 8 of extended length, 4 of mask.
const MAX_HEADER: usize = 14;

/// Frames that may wait behind the undecided tail of a fragment (empty
/// continuations, control frames): a bound on what an upstream can make
/// sidekey hold.
const MAX_WAITING: usize = 64;

impl FrameScrubber {
    /// Scrubs the next bytes from the upstream; what may go to the agent.
    pub fn push(&mut self, scrubber: &Scrubber, mut input: &[u8]) -> Result<Vec<u8>, FrameError> {
        let mut out = Vec::with_capacity(input.len() + MAX_HEADER);
        while !input.is_empty() {
            match &mut self.reading {
                Reading::Nothing => {
                    self.header.push(input[0]);
                    input = &input[1..];
                    self.start_frame(scrubber, &mut out)?;
                }
                Reading::Data { remaining, fin } => {
                    let n = input
                        .len()
                        .min(usize::try_from(*remaining).unwrap_or(usize::MAX));
                    *remaining -= n as u64;
                    let (frame_ends, fin) = (*remaining == 0, *fin);
                    let released = self
                        .message
                        .push(scrubber, Bytes::copy_from_slice(&input[..n]));
                    input = &input[n..];
                    self.release(&released, &mut out);
                    if frame_ends {
                        self.end_data_frame(scrubber, fin, &mut out);
                    }
                }
                Reading::Control {
                    remaining,
                    header,
                    payload,
                } => {
                    // At most 125: checked when the header was read.
                    let n = input.len().min(*remaining as usize);
                    payload.extend_from_slice(&input[..n]);
                    *remaining -= n as u64;
                    input = &input[n..];
                    if *remaining == 0 {
                        let (header, payload) = (std::mem::take(header), std::mem::take(payload));
                        self.end_control_frame(scrubber, header, &payload, &mut out);
                    }
                }
            }
        }
        Ok(out)
    }

    /// What was held back, once the upstream has closed.
    pub fn finish(&mut self, scrubber: &Scrubber) -> Vec<u8> {
        let mut out = Vec::new();
        let released = self.message.finish(scrubber);
        self.release(&released, &mut out);
        out
    }

    /// Reads the header once it is complete and starts its frame.
    fn start_frame(&mut self, scrubber: &Scrubber, out: &mut Vec<u8>) -> Result<(), FrameError> {
        let Some(length) = payload_length(&self.header)? else {
            return Ok(());
        };
        let header = std::mem::take(&mut self.header);
        if header[0] & 0x70 != 0 {
            return Err(FrameError::Extension);
        }
        if self.waiting.len() >= MAX_WAITING {
            return Err(FrameError::Backlog);
        }
        let fin = header[0] & 0x80 != 0;
        if header[0] & 0x08 != 0 {
            if length > 125 {
                return Err(FrameError::LongControl);
            }
            if length == 0 {
                self.end_control_frame(scrubber, header, &[], out);
            } else {
                self.reading = Reading::Control {
                    remaining: length,
                    header,
                    payload: Vec::with_capacity(length as usize),
                };
            }
            return Ok(());
        }
        self.waiting.push_back(Waiting::Data { header, length });
        self.reading = Reading::Data {
            remaining: length,
            fin,
        };
        // A header with nothing held before it goes at once.
        self.release(&[], out);
        if length == 0 {
            self.end_data_frame(scrubber, fin, out);
        }
        Ok(())
    }

    fn end_data_frame(&mut self, scrubber: &Scrubber, ends_message: bool, out: &mut Vec<u8>) {
        self.reading = Reading::Nothing;
        if ends_message {
            let released = self.message.finish(scrubber);
            self.release(&released, out);
        }
    }

    fn end_control_frame(
        &mut self,
        scrubber: &Scrubber,
        mut frame: Vec<u8>,
        payload: &[u8],
        out: &mut Vec<u8>,
    ) {
        self.reading = Reading::Nothing;
        let mut own = ScrubStream::masking();
        frame.extend_from_slice(&own.push(scrubber, Bytes::copy_from_slice(payload)));
        frame.extend_from_slice(&own.finish(scrubber));
        self.waiting.push_back(Waiting::Whole(frame));
        self.release(&[], out);
    }

    /// Appends scrubbed payload bytes to `out`, each after the header of
    /// its frame, and what they were holding back.
    fn release(&mut self, mut payload: &[u8], out: &mut Vec<u8>) {
        loop {
            if self.writing == 0 {
                match self.waiting.pop_front() {
                    Some(Waiting::Data { header, length }) => {
                        out.extend_from_slice(&header);
                        self.writing = length;
                    }
                    Some(Waiting::Whole(frame)) => out.extend_from_slice(&frame),
                    None => {
                        // Payload bytes always belong to a frame already read.
                        debug_assert!(payload.is_empty());
                        return;
                    }
                }
                continue;
            }
            if payload.is_empty() {
                return;
            }
            let n = payload
                .len()
                .min(usize::try_from(self.writing).unwrap_or(usize::MAX));
            out.extend_from_slice(&payload[..n]);
            self.writing -= n as u64;
            payload = &payload[n..];
        }
    }
}

/// The payload length once `header` is complete; `None` while it is not.
fn payload_length(header: &[u8]) -> Result<Option<u64>, FrameError> {
    let [_, second, rest @ ..] = header else {
        return Ok(None);
    };
    if second & 0x80 != 0 {
        return Err(FrameError::Masked);
    }
    let extended = match second & 0x7f {
        126 => 2,
        127 => 8,
        short => return Ok(Some(u64::from(short))),
    };
    if rest.len() < extended {
        return Ok(None);
    }
    let length = rest.iter().fold(0u64, |n, &b| (n << 8) | u64::from(b));
    if length >> 63 != 0 {
        return Err(FrameError::TooLong);
    }
    Ok(Some(length))
}

#[cfg(test)]
mod tests {
    use super::*;
    use zeroize::Zeroizing;

    const SECRET: &str = "sk-live-A1b2C3+d4/E5";

    fn scrubber() -> Scrubber {
        Scrubber::new([Zeroizing::new(SECRET.as_bytes().to_vec())]).unwrap()
    }

    /// One unmasked frame: `fin`, `opcode`, `payload`.
    fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![(u8::from(fin) << 7) | opcode];
        match payload.len() {
            n if n < 126 => out.push(n as u8),
            n if n <= 0xffff => {
                out.push(126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(payload);
        out
    }

    /// Reads frames back: (header byte, payload) each.
    fn frames_of(mut bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut frames = Vec::new();
        while !bytes.is_empty() {
            let (first, len7) = (bytes[0], bytes[1] & 0x7f);
            let (length, start) = match len7 {
                126 => (u16::from_be_bytes([bytes[2], bytes[3]]) as usize, 4),
                127 => (
                    u64::from_be_bytes(bytes[2..10].try_into().unwrap()) as usize,
                    10,
                ),
                n => (n as usize, 2),
            };
            frames.push((first, bytes[start..start + length].to_vec()));
            bytes = &bytes[start + length..];
        }
        frames
    }

    /// Feeds `input` in pieces of `step` bytes; everything that came out.
    fn scrub_in_steps(input: &[u8], step: usize) -> Vec<u8> {
        let scrubber = scrubber();
        let mut frames = FrameScrubber::default();
        let mut out = Vec::new();
        for piece in input.chunks(step) {
            out.extend(frames.push(&scrubber, piece).unwrap());
        }
        out.extend(frames.finish(&scrubber));
        out
    }

    #[test]
    fn a_secret_split_across_fragments_is_masked_and_every_frame_keeps_its_length() {
        let (head, tail) = SECRET.split_at(7);
        let mut input = frame(true, 0x1, format!("whole:{SECRET}").as_bytes());
        input.extend(frame(false, 0x1, format!("frag:{head}").as_bytes()));
        input.extend(frame(true, 0x9, b"ping")); // a control frame between fragments
        input.extend(frame(false, 0x0, &tail.as_bytes()[..4]));
        input.extend(frame(true, 0x0, format!("{}!", &tail[4..]).as_bytes()));
        input.extend(frame(true, 0x2, &[0u8; 300])); // a 16-bit length
        input.extend(frame(true, 0x8, b"")); // close, empty
        let stars = "*".repeat(SECRET.len());
        for step in [1, 2, 3, 5, 7, 64, input.len()] {
            let out = scrub_in_steps(&input, step);
            let frames = frames_of(&out);
            let firsts: Vec<u8> = frames.iter().map(|(first, _)| *first).collect();
            assert_eq!(
                firsts,
                [0x81, 0x01, 0x89, 0x00, 0x80, 0x82, 0x88],
                "step {step}"
            );
            assert_eq!(frames[0].1, format!("whole:{stars}").as_bytes());
            let message: Vec<u8> = [&frames[1].1[..], &frames[3].1, &frames[4].1].concat();
            assert_eq!(message, format!("frag:{stars}!").as_bytes(), "step {step}");
            assert_eq!(frames[2].1, b"ping");
            assert_eq!(out.len(), input.len());
            assert!(!String::from_utf8_lossy(&out).contains(SECRET));
        }
    }

    #[test]
    fn a_whole_message_is_never_held_back() {
        // It ends in what could begin the secret, but the message is over:
        // a server that now waits for the agent's reply must not stall.
        let scrubber = scrubber();
        let mut frames = FrameScrubber::default();
        let message = frame(true, 0x1, b"say sk-live");
        assert_eq!(frames.push(&scrubber, &message).unwrap(), message);
        // Mid-message, the same tail waits for the next fragment...
        let first = frame(false, 0x1, b"say sk-live");
        let out = frames.push(&scrubber, &first).unwrap();
        assert_eq!(out, first[..first.len() - "sk-live".len()]);
        // ...and a ping in between keeps its place behind it.
        let ping = frame(true, 0x9, b"p");
        assert!(frames.push(&scrubber, &ping).unwrap().is_empty());
        let last = frame(true, 0x0, b"-A1b2");
        let out = frames.push(&scrubber, &last).unwrap();
        assert_eq!(out, [b"sk-live".as_slice(), &ping, &last].concat());
    }

    #[test]
    fn masked_or_oversized_frames_from_the_upstream_are_refused() {
        let scrubber = scrubber();
        let mut frames = FrameScrubber::default();
        assert_eq!(
            frames.push(&scrubber, &[0xc1, 0x01, b'x']),
            Err(FrameError::Extension)
        );
        // Endless empty frames behind a fragment's undecided tail.
        let mut frames = FrameScrubber::default();
        frames
            .push(&scrubber, &frame(false, 0x1, b"x sk-l"))
            .unwrap();
        let empties = frame(false, 0x0, b"").repeat(MAX_WAITING + 1);
        assert_eq!(frames.push(&scrubber, &empties), Err(FrameError::Backlog));
        let mut frames = FrameScrubber::default();
        let mut long_ping = vec![0x89, 126, 0, 126];
        long_ping.extend_from_slice(&[0; 126]);
        assert_eq!(
            frames.push(&scrubber, &long_ping),
            Err(FrameError::LongControl)
        );
        let mut frames = FrameScrubber::default();
        assert_eq!(
            frames.push(&scrubber, &[0x81, 0x85, 1, 2, 3, 4]),
            Err(FrameError::Masked)
        );
        let mut frames = FrameScrubber::default();
        let mut huge = vec![0x82, 127];
        huge.extend_from_slice(&u64::MAX.to_be_bytes());
        assert_eq!(frames.push(&scrubber, &huge), Err(FrameError::TooLong));
    }
}
