/* A map named like the data path's pm_config, for tests/bpf/test_ebpf_build.py: same layout, or
 * (-DWRONG) a value of another size. */
#include <linux/bpf.h>

#ifdef WRONG
BPF_ARRAY(pm_config, u64, 1);
#else
struct twin_config { u32 words[8]; };
BPF_ARRAY(pm_config, struct twin_config, 1);
#endif
