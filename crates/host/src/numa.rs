//! NUMA nodes as sysfs shows them (`/sys/devices/system/node/nodeN/cpulist`).

use crate::{read_attr, HostRoot};

/// The online nodes (`/sys/devices/system/node/online`); empty on a kernel without NUMA.
pub fn online_nodes(root: &HostRoot) -> Vec<u32> {
    read_attr(&root.sys("devices/system/node/online"))
        .and_then(|list| parse_cpulist(&list))
        .unwrap_or_default()
}

/// The CPUs of `node`; `None` when the node does not exist.
pub fn node_cpus(root: &HostRoot, node: u32) -> Option<Vec<u32>> {
    let list = read_attr(&root.sys(&format!("devices/system/node/node{node}/cpulist")))?;
    parse_cpulist(&list)
}

/// A kernel list (`0-3,8,10-11`; empty for none); `None` when it is malformed.
pub fn parse_cpulist(text: &str) -> Option<Vec<u32>> {
    let mut cpus = Vec::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        let (first, last) = match part.split_once('-') {
            Some((a, b)) => (a.parse::<u32>().ok()?, b.parse::<u32>().ok()?),
            None => {
                let cpu = part.parse().ok()?;
                (cpu, cpu)
            }
        };
        // A range larger than any machine's CPU count is a bad list, not a big allocation.
        if last < first || last - first > 65_536 {
            return None;
        }
        cpus.extend(first..=last);
    }
    Some(cpus)
}

/// The list back in the kernel's format (`0-3,8`).
pub fn format_cpulist(cpus: &[u32]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut index = 0;
    while index < cpus.len() {
        let start = cpus[index];
        let mut end = start;
        while index + 1 < cpus.len() && cpus[index + 1] == end + 1 {
            index += 1;
            end = cpus[index];
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        index += 1;
    }
    parts.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeTree;

    #[test]
    fn cpulists_parse_and_format_back() {
        assert_eq!(
            parse_cpulist("0-3,8,10-11\n"),
            Some(vec![0, 1, 2, 3, 8, 10, 11])
        );
        assert_eq!(parse_cpulist(""), Some(vec![]));
        assert_eq!(parse_cpulist("3-1"), None);
        assert_eq!(parse_cpulist("a"), None);
        assert_eq!(parse_cpulist("0-4294967295"), None);
        assert_eq!(format_cpulist(&[0, 1, 2, 3, 8, 10, 11]), "0-3,8,10-11");
    }

    #[test]
    fn node_cpus_come_from_the_node_directory() {
        let tree = FakeTree::new();
        tree.write("sys/devices/system/node/online", "0-1\n");
        tree.write("sys/devices/system/node/node0/cpulist", "0\n");
        tree.write("sys/devices/system/node/node1/cpulist", "1\n");

        assert_eq!(online_nodes(&tree.root()), [0, 1]);
        assert_eq!(node_cpus(&tree.root(), 1), Some(vec![1]));
        assert_eq!(node_cpus(&tree.root(), 2), None);
    }
}
