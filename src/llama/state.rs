//! Reading a sequence's KV rows back out of a `llama_state_seq_get_data` blob,
//! to verify that compaction moved bytes exactly (on any backend).
//!
//! Layout (pinned llama.cpp, one stream, first cache only): magic u32, seq id
//! i32, n_stream u32, cell_count u32, per cell (pos i32, n_seq u32, seq ids),
//! v_trans u32, n_layer u32, n_rot_k u32, n_rot_v u32, per layer (K type i32,
//! row bytes u64, rows), then per layer V: (type, row bytes u64, rows) or,
//! when transposed, (type, element bytes u32, n_embd u32, dim-major elements).

/// One attention cache's cells as serialized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvDump {
    /// Position of each serialized cell, in cell order.
    pub pos: Vec<i32>,
    pub v_trans: bool,
    /// Per storage layer: (bytes per row, cell-major rows).
    pub k: Vec<(usize, Vec<u8>)>,
    /// Per storage layer: (bytes per row, rows), or when `v_trans`
    /// (bytes per element, dimension-major elements).
    pub v: Vec<(usize, Vec<u8>)>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("sequence state is truncated or not in the expected layout")]
pub struct DumpError;

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], DumpError> {
        if n > self.0.len() {
            return Err(DumpError);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u32(&mut self) -> Result<u32, DumpError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().map_err(|_| DumpError)?,
        ))
    }
    fn i32(&mut self) -> Result<i32, DumpError> {
        Ok(self.u32()? as i32)
    }
    fn u64(&mut self) -> Result<u64, DumpError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().map_err(|_| DumpError)?,
        ))
    }
}

impl KvDump {
    /// Parses the first (full-attention) cache of a single-stream sequence state.
    pub fn parse(blob: &[u8]) -> Result<KvDump, DumpError> {
        let mut r = Reader(blob);
        let (_magic, _seq) = (r.u32()?, r.i32()?);
        if r.u32()? != 1 {
            return Err(DumpError);
        }
        let n_cells = r.u32()? as usize;
        let mut pos = Vec::with_capacity(n_cells);
        for _ in 0..n_cells {
            pos.push(r.i32()?);
            let n_seq = r.u32()?;
            for _ in 0..n_seq {
                r.i32()?;
            }
        }
        let v_trans = r.u32()? == 1;
        let n_layer = r.u32()? as usize;
        let (_rot_k, _rot_v) = (r.u32()?, r.u32()?);
        let mut k = Vec::with_capacity(n_layer);
        for _ in 0..n_layer {
            let _type = r.i32()?;
            let row = r.u64()? as usize;
            k.push((row, r.take(row * n_cells)?.to_vec()));
        }
        let mut v = Vec::with_capacity(n_layer);
        for _ in 0..n_layer {
            let _type = r.i32()?;
            if v_trans {
                let el = r.u32()? as usize;
                let n_embd = r.u32()? as usize;
                v.push((el, r.take(el * n_embd * n_cells)?.to_vec()));
            } else {
                let row = r.u64()? as usize;
                v.push((row, r.take(row * n_cells)?.to_vec()));
            }
        }
        Ok(KvDump { pos, v_trans, k, v })
    }

    /// Bytes of head `h` of cell `cell` in storage layer `l`'s K.
    pub fn k_head(&self, l: usize, cell: usize, h: usize, n_head: usize) -> &[u8] {
        let (row, ref data) = self.k[l];
        let hb = row / n_head;
        &data[cell * row + h * hb..][..hb]
    }

    /// Bytes of head `h` of cell `cell` in storage layer `l`'s V, gathered
    /// across dimensions when V is transposed.
    pub fn v_head(&self, l: usize, cell: usize, h: usize, n_head: usize) -> Vec<u8> {
        let (unit, ref data) = self.v[l];
        let n_cells = self.pos.len();
        if self.v_trans {
            let n_embd = data.len() / unit / n_cells.max(1);
            let d = n_embd / n_head;
            (h * d..(h + 1) * d)
                .flat_map(|j| data[(j * n_cells + cell) * unit..][..unit].iter().copied())
                .collect()
        } else {
            let hb = unit / n_head;
            data[cell * unit + h * hb..][..hb].to_vec()
        }
    }
}
