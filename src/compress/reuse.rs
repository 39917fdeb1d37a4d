//! Layer-wise index reuse (ChunkKV Alg. 2): consecutive groups of compressed
//! layers share one kept set, scored only by the group's first (leader) layer.

/// Groups of storage-layer indices (positions in the cache's layer list).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReuseGroups {
    groups: Vec<Vec<usize>>,
}

impl ReuseGroups {
    /// `n_layers` compressed layers in groups of `n_reuse` (1: every layer scores itself;
    /// `n_reuse >= n_layers`: one set for all layers).
    pub fn new(n_layers: usize, n_reuse: usize) -> Self {
        let n_reuse = n_reuse.max(1);
        let idx: Vec<usize> = (0..n_layers).collect();
        Self {
            groups: idx.chunks(n_reuse).map(<[usize]>::to_vec).collect(),
        }
    }

    pub fn groups(&self) -> &[Vec<usize>] {
        &self.groups
    }

    /// The leader of each group (the first storage layer).
    pub fn leaders(&self) -> impl Iterator<Item = usize> + '_ {
        self.groups.iter().map(|g| g[0])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_are_consecutive_and_led_by_their_first_layer() {
        let g = ReuseGroups::new(5, 2);
        assert_eq!(g.groups(), &[vec![0, 1], vec![2, 3], vec![4]]);
        assert_eq!(g.leaders().collect::<Vec<_>>(), vec![0, 2, 4]);
        assert_eq!(ReuseGroups::new(4, 1).leaders().count(), 4);
        assert_eq!(ReuseGroups::new(4, 99).groups(), &[vec![0, 1, 2, 3]]);
    }
}
