#!/usr/bin/env python3
"""Per-source-line profile of a loaded BPF program, from perf's sample addresses.

perf here has no BPF disassembler (no libbfd), so `perf annotate` cannot look
inside a JITed program. This maps each sample's address to the program's BTF
line records through the kernel's `jited_line_info` (BPF_OBJ_GET_INFO_BY_FD),
and each record to its source line through `bpftool prog dump xlated linum`.
With JIT_OUT=FILE it also writes the JIT image (disassemble it with
`objdump -D -b binary -m i386:x86-64 FILE`) and FILE.offs, samples per offset
of the program's main function.

It needs bpftool (`apt-get install bpftool`; a developer's tool, not the
tests', so `cargo xtask setup` does not install it) and perf. Run it while
the program is still loaded, e.g. (docs/architecture.md, "IPv6"):

    lb bench --profile-lb 45 --profile-v6 &      # a steady load
    sleep 12
    ID=$(bpftool prog show | grep 'name lb_v6 ' | cut -d: -f1)
    bpftool prog dump xlated id $ID linum > xlated.txt
    perf record -o p.data -a -e cpu-clock -- sleep 15
    perf script -i p.data -F ip,sym > ips.txt
    tools/bpf-line-profile.py $ID xlated.txt ips.txt 30

usage: bpf-line-profile.py PROG_ID XLATED_LINUM_DUMP PERF_SCRIPT_IPS [TOP]
"""
import bisect
import collections
import ctypes
import os
import re
import struct
import sys

SYS_BPF = 321  # x86_64
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
INFO_LEN = 240  # struct bpf_prog_info, with room to spare
libc = ctypes.CDLL(None, use_errno=True)


def bpf(cmd, attr):
    buf = ctypes.create_string_buffer(attr, len(attr))
    r = libc.syscall(SYS_BPF, cmd, buf, len(attr))
    if r < 0:
        raise OSError(ctypes.get_errno(), f"bpf command {cmd}")
    return r


def prog_info(fd, info):
    buf = ctypes.create_string_buffer(bytes(info), INFO_LEN)
    attr = struct.pack("IIQ", fd, INFO_LEN, ctypes.addressof(buf)) + b"\0" * 104
    bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
    return buf.raw


def main():
    if len(sys.argv) < 4 or not sys.argv[1].isdigit():
        # A missing id (e.g. `bpftool prog show | grep` found no program)
        # gets the usage, not a traceback.
        sys.exit(__doc__)
    prog_id = int(sys.argv[1])
    top = int(sys.argv[4]) if len(sys.argv) > 4 else 40
    fd = bpf(BPF_PROG_GET_FD_BY_ID, struct.pack("III", prog_id, 0, 0) + b"\0" * 116)
    # First the counts (offsets of struct bpf_prog_info, linux/bpf.h), then
    # the arrays.
    raw = prog_info(fd, bytearray(INFO_LEN))
    (jit_len,) = struct.unpack_from("I", raw, 16)
    nr_ksyms, nr_lens = struct.unpack_from("II", raw, 104)
    (nr_line,) = struct.unpack_from("I", raw, 148)
    nr_jline, line_rec, jline_rec = struct.unpack_from("III", raw, 168)
    jit = ctypes.create_string_buffer(jit_len)
    ksyms = (ctypes.c_uint64 * nr_ksyms)()
    lens = (ctypes.c_uint32 * nr_lens)()
    lines = ctypes.create_string_buffer(nr_line * line_rec)
    jlines = (ctypes.c_uint64 * nr_jline)()
    info = bytearray(INFO_LEN)
    struct.pack_into("I", info, 16, jit_len)
    struct.pack_into("Q", info, 24, ctypes.addressof(jit))
    struct.pack_into("II", info, 104, nr_ksyms, nr_lens)
    struct.pack_into("QQ", info, 112, ctypes.addressof(ksyms), ctypes.addressof(lens))
    struct.pack_into("I", info, 148, nr_line)
    struct.pack_into("QQ", info, 152, ctypes.addressof(lines), ctypes.addressof(jlines))
    struct.pack_into("III", info, 168, nr_jline, line_rec, jline_rec)
    prog_info(fd, info)
    records = [struct.unpack_from("IIII", lines.raw, i * line_rec) for i in range(nr_line)]

    # The xlated dump: instruction index -> the source line printed before it.
    source, current = {}, None
    for line in open(sys.argv[2]):
        if line.startswith(";"):
            current = re.sub(
                r"\[file:/[^ ]*/([^/ ]+/[^/ ]+) line_num:(\d+).*\]", r"[\1:\2]", line[1:].strip()
            )
        else:
            m = re.match(r"\s*(\d+):", line)
            if m:
                source[int(m.group(1))] = current

    order = sorted(range(nr_jline), key=lambda i: jlines[i])
    addrs = [jlines[i] for i in order]
    low = min(ksyms)
    high = max(ksyms[i] + lens[i] for i in range(nr_lens))
    by_line, offsets, total = collections.Counter(), collections.Counter(), 0
    for line in open(sys.argv[3]):
        parts = line.split()
        try:
            ip = int(parts[0], 16)
        except (ValueError, IndexError):
            continue
        if not low <= ip < high:
            continue
        total += 1
        if ksyms[0] <= ip < ksyms[0] + lens[0]:
            offsets[ip - ksyms[0]] += 1
        k = bisect.bisect_right(addrs, ip) - 1
        if k >= 0:
            by_line[source.get(records[order[k]][0], "?")] += 1
    if os.environ.get("JIT_OUT"):
        out = os.environ["JIT_OUT"]
        open(out, "wb").write(jit.raw)
        with open(out + ".offs", "w") as f:
            for off, n in sorted(offsets.items()):
                f.write(f"{off:x} {n}\n")
    print(f"{total} samples in the program")
    for text, n in by_line.most_common(top):
        print(f"{100 * n / max(total, 1):5.1f}%  {text[:150]}")


if __name__ == "__main__":
    main()
