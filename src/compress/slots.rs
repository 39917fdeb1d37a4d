//! Which token position each cell slot holds, per storage layer and KV head.
//!
//! llama.cpp keeps one position per cell, shared by all layers. After a
//! compaction that kept different tokens in different layers or heads, slot
//! `i` holds different positions there; this table remembers them so later
//! importance (a second compression in a chat) maps back to real positions.

use crate::llama::Pos;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlotTable {
    /// `pos[layer][head][slot]` for slots `0..n_slots()`, layer = storage index.
    pos: Vec<Vec<Vec<Pos>>>,
}

impl SlotTable {
    /// Slots covered by the table (cells beyond hold what llama.cpp's metadata says).
    pub fn n_slots(&self) -> usize {
        self.pos.first().and_then(|l| l.first()).map_or(0, Vec::len)
    }

    /// Storage layers covered by the table.
    pub fn n_layers(&self) -> usize {
        self.pos.len()
    }

    /// The position held by `cell` in storage layer `layer`, head `head`;
    /// `meta` is llama.cpp's per-cell position.
    pub fn position(
        &self,
        layer: usize,
        head: usize,
        cell: usize,
        meta: &[Option<Pos>],
    ) -> Option<Pos> {
        if cell < self.n_slots() {
            let p = self.pos[layer][head][cell];
            // A dead slot (a layer's surplus after a per-layer compaction) holds nothing.
            (p >= 0).then_some(p)
        } else {
            meta.get(cell).copied().flatten()
        }
    }

    /// Positions kept in slots `0..` of storage layer `layer`, head `head`
    /// (-1: a dead slot); empty before the first compaction.
    pub fn positions(&self, layer: usize, head: usize) -> &[Pos] {
        self.pos
            .get(layer)
            .and_then(|l| l.get(head))
            .map_or(&[], Vec::as_slice)
    }

    /// Dead slots (holding no token) per storage layer, averaged over layers.
    pub fn mean_dead(&self) -> f64 {
        if self.pos.is_empty() {
            return 0.0;
        }
        let dead: usize = self
            .pos
            .iter()
            .map(|l| {
                l.first()
                    .map_or(0, |h| h.iter().filter(|&&p| p < 0).count())
            })
            .sum();
        dead as f64 / self.pos.len() as f64
    }

    /// Whether `cell` is a slot of an earlier compaction.
    pub fn is_compacted(&self, cell: usize) -> bool {
        cell < self.n_slots()
    }

    /// Whether storage layers `a` and `b` hold the same position in every slot of head `h`.
    pub fn same_positions(&self, a: usize, b: usize, h: usize) -> bool {
        self.n_slots() == 0 || a == b || self.pos[a].get(h) == self.pos[b].get(h)
    }

    /// Whether heads `a` and `b` of storage layer `l` hold the same position in every slot.
    pub fn heads_agree(&self, l: usize, a: usize, b: usize) -> bool {
        self.n_slots() == 0 || a == b || self.pos[l].get(a) == self.pos[l].get(b)
    }

    /// Records a compaction: `kept[layer][head]` lists the positions now in slots `0..`.
    pub fn replace(&mut self, kept: Vec<Vec<Vec<Pos>>>) {
        self.pos = kept;
    }

    /// Forgets everything (the cache was cleared).
    pub fn clear(&mut self) {
        self.pos.clear();
    }
}
