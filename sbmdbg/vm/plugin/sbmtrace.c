/*
 * sbmtrace: a QEMU TCG plugin that lets sbmdbg trace SandBox Mode
 * transitions without stopping the guest.
 *
 * QEMU 7.2 (Debian 12) gives plugins no register access, so the plugin only
 * does what needs no registers, synchronously on the vCPU thread:
 *
 *   - probes on instruction addresses sent by sbmdbg after boot (KASLR):
 *       stamp  write "@sbm H <tag> <vcpu> <ns> <tsc>"     (IDT handler entries)
 *       ctx    write "@sbm P <tag> <vcpu> <ns> <tsc> ..."  plus a snapshot of
 *              the vCPU's current task (pcpu_hot.current_task -> pid, comm,
 *              thread_info.sbm_state -> the x86_sbm_state words -> sbm->error)
 *       mem    like ctx, plus the first memory access of the instruction:
 *              its virtual and physical address and N words read there
 *              (iretq: the IRET frame)
 *   - every sensitive instruction a vCPU executes inside a sandbox
 *       insn   write "@sbm S insn <vcpu> <ns> <tsc> va=VADDR b=BYTES"
 *              (see "sandbox instruction watch" below)
 *       frame  on the first push of an IDT handler (its store lands just
 *              below the hardware exception frame): if the frame's CS is at
 *              CPL 3 and the vCPU's task is in a sandbox (sbm_state set),
 *              write "@sbm F <tag> ..." with the task and mw=the pushed word,
 *              [error code,] RIP, CS, RFLAGS, RSP, SS (NWORDS 7 or 6); the
 *              registers the entry code then saves next to it (pt_regs) are
 *              written as "@sbm R ..." rw=... at the next "regs" probe
 *              (sync_regs) or the next probe of that vCPU.  No -d int needed.
 *       sbment on the first store of .Lerror_entry_from_sbm (andb $~3,
 *              CS+8(%rsp)): reached only by an entry from a sandbox, with
 *              pt_regs complete at the store's address - offsetof(cs) and
 *              the entry stub's return address below it: writes "@sbm E"
 *              with the task, ra=RETURN_ADDRESS and rw=pt_regs words.  The
 *              vectors that enter through error_entry then need no frame
 *              probe (a frame probe runs at every entry of its vector,
 *              kernel-mode ones too).
 *   - guest memory is read from QEMU's memory-backend-file (share=on), mapped
 *     read-only; every read is bounds-checked (guest memory is untrusted).
 *
 * Everything the plugin writes goes through qemu_plugin_outs(), i.e. into
 * QEMU's log: with "-d int,plugin,tid" each vCPU thread has its own file
 * in which the plugin's lines and QEMU's exception log (vector, error code,
 * CR2, every register) are in execution order.  sbmdbg merges the two.
 *
 * Control: a unix socket (sock=PATH).  One command per line, one reply line:
 *   ram PATH SIZE BELOW4G      map guest RAM
 *   ctx PAGE_OFFSET OFF_PID OFF_COMM OFF_SBM_STATE STATE_WORDS OFF_SBM OFF_ERROR
 *   cpu VCPU PHYS_OF_CURRENT_TASK
 *   jiffies PHYS                 (adds " j=JIFFIES" to every line)
 *   ptregs OFF_IP NWORDS         (struct pt_regs: offset of ip, size in words)
 *   probe VADDR TAG KIND [NWORDS]  (KIND: stamp | ctx | mem | frame | regs | sbment)
 *   arm | disarm                  apply (flushes QEMU's translation cache)
 *   status
 *   insns                         sandbox instruction watch counters (issue 15)
 *   insnskip LO HI                not watched: the kernel's entry text [LO, HI)
 *   frames                        frame probes with > 100 stores: "tag=count ..."
 *
 * Written for sbmdbg from QEMU's documented plugin API (version 1, QEMU 7.2);
 * the few declarations it needs are below, since Debian ships no header.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>
#include <x86intrin.h>

/* ---- the QEMU plugin API (v1) declarations used here ---- */
typedef uint64_t qemu_plugin_id_t;
typedef uint32_t qemu_plugin_meminfo_t;
struct qemu_plugin_tb;
struct qemu_plugin_insn;
struct qemu_plugin_hwaddr;
typedef struct {
    const char *target_name;
    struct { int min; int cur; } version;
    bool system_emulation;
    union { struct { int smp_vcpus; int max_vcpus; } system; };
} qemu_info_t;
enum qemu_plugin_cb_flags { QEMU_PLUGIN_CB_NO_REGS, QEMU_PLUGIN_CB_R_REGS, QEMU_PLUGIN_CB_RW_REGS };
enum qemu_plugin_mem_rw { QEMU_PLUGIN_MEM_R = 1, QEMU_PLUGIN_MEM_W, QEMU_PLUGIN_MEM_RW };
typedef void (*qemu_plugin_simple_cb_t)(qemu_plugin_id_t id);
typedef void (*qemu_plugin_vcpu_simple_cb_t)(qemu_plugin_id_t id, unsigned int vcpu_index);
typedef void (*qemu_plugin_vcpu_udata_cb_t)(unsigned int vcpu_index, void *userdata);
typedef void (*qemu_plugin_vcpu_tb_trans_cb_t)(qemu_plugin_id_t id, struct qemu_plugin_tb *tb);
typedef void (*qemu_plugin_vcpu_mem_cb_t)(unsigned int vcpu_index, qemu_plugin_meminfo_t info,
                                          uint64_t vaddr, void *userdata);
extern void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t, qemu_plugin_vcpu_tb_trans_cb_t);
extern void qemu_plugin_register_vcpu_idle_cb(qemu_plugin_id_t, qemu_plugin_vcpu_simple_cb_t);
extern void qemu_plugin_register_vcpu_insn_exec_cb(struct qemu_plugin_insn *, qemu_plugin_vcpu_udata_cb_t,
                                                   enum qemu_plugin_cb_flags, void *);
extern void qemu_plugin_register_vcpu_mem_cb(struct qemu_plugin_insn *, qemu_plugin_vcpu_mem_cb_t,
                                             enum qemu_plugin_cb_flags, enum qemu_plugin_mem_rw, void *);
extern size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *);
extern struct qemu_plugin_insn *qemu_plugin_tb_get_insn(const struct qemu_plugin_tb *, size_t);
extern uint64_t qemu_plugin_insn_vaddr(const struct qemu_plugin_insn *);
extern const void *qemu_plugin_insn_data(const struct qemu_plugin_insn *);
extern size_t qemu_plugin_insn_size(const struct qemu_plugin_insn *);
extern struct qemu_plugin_hwaddr *qemu_plugin_get_hwaddr(qemu_plugin_meminfo_t, uint64_t);
extern bool qemu_plugin_hwaddr_is_io(const struct qemu_plugin_hwaddr *);
extern uint64_t qemu_plugin_hwaddr_phys_addr(const struct qemu_plugin_hwaddr *);
extern bool qemu_plugin_mem_is_store(qemu_plugin_meminfo_t);
extern void qemu_plugin_reset(qemu_plugin_id_t, qemu_plugin_simple_cb_t);
extern void qemu_plugin_outs(const char *);

__attribute__((visibility("default"))) int qemu_plugin_version = 1;

/* ---- state ---- */
#define MAX_PROBES 1024
#define MAX_VCPUS 64
#define MAX_WORDS 24
#define FOUR_GIB (4ULL << 30)

enum kind { K_STAMP, K_CTX, K_MEM, K_FRAME, K_REGS, K_SBMENT };

struct probe {
    uint64_t vaddr;
    char tag[32];
    enum kind kind;
    int nwords;
    uint64_t count;              /* frame probes: stores seen ("frames" command) */
};

struct table {                  /* immutable once published */
    int n;
    struct probe p[MAX_PROBES];  /* sorted by vaddr */
};

static qemu_plugin_id_t plugin_id;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct table *staged;          /* being built by the control thread */
static struct table *active;          /* what translation instruments */
static struct table *pending;         /* to become active at the next reset */
static volatile int reset_wanted;
static volatile int reset_done_gen, reset_want_gen;

static const uint8_t *ram;
static uint64_t ram_size, below_4g;

static struct {
    uint64_t page_offset;
    uint64_t off_pid, off_comm, off_sbm_state, off_sbm, off_error;
    int state_words;
    int valid;
} ctx;
static uint64_t cur_task_phys[MAX_VCPUS];
static uint64_t jiffies_phys;

/* per vCPU: the mem probe whose first access we wait for */
static const struct probe *want_mem[MAX_VCPUS];
static char line_buf[MAX_VCPUS][1024];
static uint64_t line_seq[MAX_VCPUS];   /* q= on every line: the reader sees any gap */
static uint64_t hits, snapshots, bad_reads, mem_armed, mem_lost, lines_out;

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* guest-physical -> pointer into the RAM file, or NULL (bounds-checked) */
static const uint8_t *phys(uint64_t pa, uint64_t n)
{
    if (!ram || n > ram_size)
        return NULL;
    if (pa < below_4g && pa + n <= below_4g)
        return ram + pa;
    if (pa >= FOUR_GIB && pa - FOUR_GIB + n <= ram_size - below_4g)
        return ram + below_4g + (pa - FOUR_GIB);
    return NULL;
}

static int rd64(uint64_t pa, uint64_t *out)
{
    const uint8_t *p = phys(pa, 8);
    if (!p) {
        __atomic_fetch_add(&bad_reads, 1, __ATOMIC_RELAXED);
        return -1;
    }
    memcpy(out, p, 8);
    return 0;
}

/* direct-map virtual -> physical */
static int dm(uint64_t va, uint64_t *pa)
{
    if (!ctx.valid || va < ctx.page_offset)
        return -1;
    *pa = va - ctx.page_offset;
    return 0;
}

static int put(char *b, int at, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int put(char *b, int at, const char *fmt, ...)
{
    va_list ap;
    int n;
    if (at >= 1000)
        return at;
    va_start(ap, fmt);
    n = vsnprintf(b + at, 1000 - at, fmt, ap);
    va_end(ap);
    return n < 0 ? at : (at + n > 1000 ? 1000 : at + n);
}

/* " t=TASK pid=PID comm=HEX st=STATE sw=W0,W1.. err=E" */
static int put_task(char *b, int at, unsigned vcpu)
{
    uint64_t task, tpa, v, st, spa, sbm, bpa;
    const uint8_t *c;
    if (vcpu >= MAX_VCPUS || !cur_task_phys[vcpu] || rd64(cur_task_phys[vcpu], &task))
        return at;
    at = put(b, at, " t=%" PRIx64, task);
    if (dm(task, &tpa))
        return at;
    if (!rd64(tpa + ctx.off_pid, &v))
        at = put(b, at, " pid=%u", (unsigned)(v & 0xffffffff));
    c = phys(tpa + ctx.off_comm, 16);
    if (c) {
        at = put(b, at, " comm=");
        for (int i = 0; i < 16; i++)
            at = put(b, at, "%02x", c[i]);
    }
    if (rd64(tpa + ctx.off_sbm_state, &st))
        return at;
    at = put(b, at, " st=%" PRIx64, st);
    if (!st || dm(st, &spa))
        return at;
    at = put(b, at, " sw=");
    for (int i = 0; i < ctx.state_words && i < MAX_WORDS; i++) {
        if (rd64(spa + 8 * (uint64_t)i, &v))
            break;
        at = put(b, at, i ? ",%" PRIx64 : "%" PRIx64, v);
    }
    if (!rd64(spa + ctx.off_sbm, &sbm) && sbm && !dm(sbm, &bpa) && !rd64(bpa + ctx.off_error, &v))
        at = put(b, at, " err=%d", (int)(v & 0xffffffff));
    return at;
}

/* " j=JIFFIES" (the guest's clock) */
static int put_jiffies(char *b, int at)
{
    uint64_t j;
    if (jiffies_phys && !rd64(jiffies_phys, &j))
        at = put(b, at, " j=%" PRIu64, j);
    return at;
}

static void emit(char *b, int at)
{
    if (at > 1000)
        at = 1000;
    b[at++] = '\n';
    b[at] = 0;
    qemu_plugin_outs(b);
    __atomic_fetch_add(&lines_out, 1, __ATOMIC_RELAXED);
}

/* ---- sandbox instruction watch (issue 15) ----
 * Between a vCPU's enter probe and its exit probe, and outside the kernel's
 * handlers meanwhile (from an IDT handler stamp to the resume probe), every
 * instruction that can change state outside the sandbox (or try to) is
 * written as
 *   "@sbm S insn <vcpu> <ns> <tsc> q=N [j=J] va=VADDR b=BYTES"
 * before it executes.  At translation time a small opcode classifier looks
 * at the bytes QEMU translated and registers an exec callback on the
 * sensitive ones only; the callback writes a line only while its vCPU is
 * inside a sandbox.  sbmdbg names the instruction from the bytes
 * (sbmdbg.sbm.attack.sensitive_insn).  QEMU 7.2 gives plugins no
 * registers, so "inside" is the probes' state machine, not a CR3 check. */
struct sens {
    uint64_t vaddr;
    uint8_t n, used, to_kernel;     /* to_kernel: syscall/sysenter (no IDT stamp) */
    uint8_t b[15];
};
#define SENS_SLOTS 8192
static struct sens sens_tab[SENS_SLOTS];   /* interned; never freed (callbacks point here) */
static uint8_t sbx_in[MAX_VCPUS];          /* between enter and exit */
static uint8_t sbx_kern[MAX_VCPUS];        /* ... and in a kernel handler */
static char sbx_buf[MAX_VCPUS][256];
static uint64_t sbx_lines, sbx_sites, sbx_full;
/* kernel entry text ("insnskip LO HI"): what runs there on a sandbox's vCPU is
 * the kernel entering (supervisor-only pages: CPL 3 cannot execute them), before
 * any probe says so when there are no handler stamps (the frame source) */
static uint64_t sbx_skip_lo, sbx_skip_hi;

/* 0: not sensitive, 1: sensitive, 2: sensitive and enters the kernel without the IDT */
static int sbx_classify(const uint8_t *c, size_t n)
{
    size_t i = 0;
    int f3 = 0, has_m, has_r, reg, mem;
    uint8_t op, m, r;
    while (i < n && i < 14 && (c[i] == 0x66 || c[i] == 0x67 || c[i] == 0xf2 || c[i] == 0xf3 ||
                               c[i] == 0x2e || c[i] == 0x36 || c[i] == 0x3e || c[i] == 0x26 ||
                               c[i] == 0x64 || c[i] == 0x65 || c[i] == 0xf0)) {
        f3 |= c[i] == 0xf3;
        i++;
    }
    if (i < n && (c[i] & 0xf0) == 0x40)      /* REX */
        i++;
    if (i >= n)
        return 0;
    op = c[i];
    has_m = i + 1 < n;
    m = has_m ? c[i + 1] : 0;
    reg = (m >> 3) & 7;
    mem = (m >> 6) != 3;
    switch (op) {
    case 0x07: case 0x17: case 0x1f:                        /* pop %es/%ss/%ds */
    case 0x6c: case 0x6d: case 0x6e: case 0x6f:             /* ins, outs */
    case 0x9a: case 0xea:                                   /* lcall, ljmp ptr16:32 */
    case 0x9d: case 0xcf:                                   /* popf, iret */
    case 0xca: case 0xcb:                                   /* lret */
    case 0xcc: case 0xcd: case 0xce: case 0xf1:             /* int3, int n, into, int1 */
    case 0xe4: case 0xe5: case 0xe6: case 0xe7:             /* in, out imm8 */
    case 0xec: case 0xed: case 0xee: case 0xef:             /* in, out %dx */
    case 0xf4: case 0xfa: case 0xfb:                        /* hlt, cli, sti */
        return 1;
    case 0x8e:                                              /* mov to a segment register */
        return has_m && reg <= 5;
    case 0xff:                                              /* lcall/ljmp m16:64 */
        return has_m && mem && (reg == 3 || reg == 5);
    case 0xd9:                                              /* fldenv, fldcw */
        return has_m && mem && (reg == 4 || reg == 5);
    case 0xdd:                                              /* frstor */
        return has_m && mem && reg == 4;
    case 0x0f:
        break;
    default:
        return 0;
    }
    if (!has_m)
        return 0;
    has_r = i + 2 < n;
    r = has_r ? c[i + 2] : 0;
    reg = (r >> 3) & 7;
    mem = (r >> 6) != 3;
    switch (m) {
    case 0x05: case 0x34:                                   /* syscall, sysenter */
        return 2;
    case 0x06: case 0x07: case 0x08: case 0x09: case 0x0b: /* clts sysret invd wbinvd ud2 */
    case 0x20: case 0x21: case 0x22: case 0x23:             /* mov cr/dr */
    case 0x30: case 0x32: case 0x35:                        /* wrmsr rdmsr sysexit */
    case 0xa1: case 0xa9:                                   /* pop %fs/%gs */
    case 0xb2: case 0xb4: case 0xb5:                        /* lss lfs lgs */
    case 0xb9: case 0xff:                                   /* ud1 ud0 */
        return 1;
    case 0x00:                                              /* lldt, ltr */
        return has_r && (reg == 2 || reg == 3);
    case 0x01:
        if (!has_r)
            return 0;
        if (mem)                                            /* lgdt lidt lmsw invlpg */
            return reg == 2 || reg == 3 || reg == 6 || reg == 7;
        return r == 0xef || r == 0xf8 || r == 0xca || r == 0xcb || r == 0xd1;  /* wrpkru swapgs clac stac xsetbv */
    case 0xae:
        if (!has_r)
            return 0;
        if (!mem)                                           /* wrfsbase, wrgsbase */
            return f3 && (reg == 2 || reg == 3);
        return reg == 1 || reg == 2 || reg == 5;            /* fxrstor ldmxcsr xrstor */
    case 0xc7:                                              /* xrstors */
        return has_r && mem && reg == 3;
    default:
        return 0;
    }
}

static struct sens *sbx_intern(uint64_t va, const uint8_t *b, size_t n, int to_kernel)
{
    uint64_t h = va * 0x9e3779b97f4a7c15ULL;
    struct sens *s = NULL;
    for (size_t j = 0; j < n; j++)
        h = (h ^ b[j]) * 0x100000001b3ULL;
    pthread_mutex_lock(&lock);
    for (int probe = 0; probe < SENS_SLOTS; probe++) {
        struct sens *e = &sens_tab[(h + (uint64_t)probe) % SENS_SLOTS];
        if (!e->used) {
            e->vaddr = va;
            e->n = (uint8_t)n;
            e->to_kernel = (uint8_t)to_kernel;
            memcpy(e->b, b, n);
            __atomic_store_n(&e->used, 1, __ATOMIC_RELEASE);
            sbx_sites++;
            s = e;
            break;
        }
        if (e->vaddr == va && e->n == n && !memcmp(e->b, b, n)) {
            s = e;
            break;
        }
    }
    if (!s)
        sbx_full++;
    pthread_mutex_unlock(&lock);
    return s;
}

static void sbx_on_insn(unsigned int vcpu, void *udata)
{
    const struct sens *s = udata;
    char *b;
    int at;
    if (vcpu >= MAX_VCPUS || !sbx_in[vcpu] || sbx_kern[vcpu])
        return;
    b = sbx_buf[vcpu];
    at = snprintf(b, 200, "@sbm S insn %u %" PRIu64 " %llu q=%" PRIu64, vcpu, now_ns(),
                  (unsigned long long)__rdtsc(), line_seq[vcpu]++);
    if (at < 0 || at > 200)
        return;
    if (jiffies_phys) {
        uint64_t j;
        if (!rd64(jiffies_phys, &j))
            at += snprintf(b + at, 30, " j=%" PRIu64, j);
    }
    at += snprintf(b + at, 24, " va=%" PRIx64, s->vaddr);
    at += snprintf(b + at, 4, " b=");
    for (int i = 0; i < s->n && i < 15; i++)
        at += snprintf(b + at, 3, "%02x", s->b[i]);
    b[at++] = '\n';
    b[at] = 0;
    qemu_plugin_outs(b);
    __atomic_fetch_add(&sbx_lines, 1, __ATOMIC_RELAXED);
    __atomic_fetch_add(&lines_out, 1, __ATOMIC_RELAXED);
    if (s->to_kernel)
        sbx_kern[vcpu] = 1;      /* syscall/sysenter: the kernel runs next, no IDT stamp */
}

/* translation: instrument a non-probe instruction if it is sensitive */
static void sbx_watch(struct qemu_plugin_insn *insn)
{
    const uint8_t *b = qemu_plugin_insn_data(insn);
    size_t n = qemu_plugin_insn_size(insn);
    uint64_t va = qemu_plugin_insn_vaddr(insn);
    struct sens *s;
    int k;
    /* a sandbox's user half is empty: its code is kernel text and module
     * code at their kernel addresses; user processes are not watched */
    if (!b || !n || n > 15 || va < (1ULL << 47) || (va >= sbx_skip_lo && va < sbx_skip_hi))
        return;
    k = sbx_classify(b, n);
    if (!k || !(s = sbx_intern(va, b, n, k == 2)))
        return;
    qemu_plugin_register_vcpu_insn_exec_cb(insn, sbx_on_insn, QEMU_PLUGIN_CB_NO_REGS, s);
}

/* a probe fired: enter/exit/resume and the IDT handler stamps move the state */
static void sbx_probe(unsigned int vcpu, const struct probe *p)
{
    if (vcpu >= MAX_VCPUS)
        return;
    if (p->kind == K_STAMP)
        sbx_kern[vcpu] = 1;
    else if (!strcmp(p->tag, "enter"))
        sbx_in[vcpu] = 1, sbx_kern[vcpu] = 0;
    else if (!strcmp(p->tag, "exit"))
        sbx_in[vcpu] = 0, sbx_kern[vcpu] = 0;
    else if (!strcmp(p->tag, "resume"))
        sbx_kern[vcpu] = 0;
}

/* the frame source's entry probes: the kernel runs on this vCPU from here */
static void sbx_kernel_entered(unsigned int vcpu)
{
    if (vcpu < MAX_VCPUS)
        sbx_kern[vcpu] = 1;
}

static void sbx_reset(void)
{
    memset(sbx_in, 0, sizeof(sbx_in));
    memset(sbx_kern, 0, sizeof(sbx_kern));
}

static void sbx_status(int fd);
static void frame_flush_regs(unsigned int vcpu);

static void on_insn(unsigned int vcpu, void *udata)
{
    const struct probe *p = udata;
    char *b = line_buf[vcpu % MAX_VCPUS];
    int at;
    __atomic_fetch_add(&hits, 1, __ATOMIC_RELAXED);
    sbx_probe(vcpu, p);
    frame_flush_regs(vcpu);
    if (p->kind == K_STAMP) {
        at = put(b, 0, "@sbm H %s %u %" PRIu64 " %llu q=%" PRIu64, p->tag, vcpu, now_ns(),
                 (unsigned long long)__rdtsc(), line_seq[vcpu % MAX_VCPUS]++);
        emit(b, put_jiffies(b, at));
        return;
    }
    at = put(b, 0, "@sbm P %s %u %" PRIu64 " %llu q=%" PRIu64, p->tag, vcpu, now_ns(),
             (unsigned long long)__rdtsc(), line_seq[vcpu % MAX_VCPUS]++);
    at = put_jiffies(b, at);
    at = put_task(b, at, vcpu);
    if (p->kind == K_MEM && vcpu < MAX_VCPUS) {
        if (want_mem[vcpu])      /* the last one never saw its access */
            __atomic_fetch_add(&mem_lost, 1, __ATOMIC_RELAXED);
        __atomic_fetch_add(&mem_armed, 1, __ATOMIC_RELAXED);
        want_mem[vcpu] = p;      /* the line ends at the first access */
        line_buf[vcpu][at] = 0;
        return;
    }
    emit(b, at);
}

static void on_mem(unsigned int vcpu, qemu_plugin_meminfo_t info, uint64_t vaddr, void *udata)
{
    const struct probe *p = udata;
    struct qemu_plugin_hwaddr *hw;
    char *b;
    int at;
    uint64_t pa, v;
    if (vcpu >= MAX_VCPUS || want_mem[vcpu] != p)
        return;
    want_mem[vcpu] = NULL;
    b = line_buf[vcpu];
    at = (int)strlen(b);
    at = put(b, at, " mva=%" PRIx64, vaddr);
    hw = qemu_plugin_get_hwaddr(info, vaddr);
    if (hw && !qemu_plugin_hwaddr_is_io(hw)) {
        pa = qemu_plugin_hwaddr_phys_addr(hw);
        at = put(b, at, " mpa=%" PRIx64 " mw=", pa);
        for (int i = 0; i < p->nwords && i < MAX_WORDS; i++) {
            if (rd64(pa + 8 * (uint64_t)i, &v))
                break;
            at = put(b, at, i ? ",%" PRIx64 : "%" PRIx64, v);
        }
        __atomic_fetch_add(&snapshots, 1, __ATOMIC_RELAXED);
    }
    emit(b, at);
}

/* ---- frame probes: the exception frame from guest RAM (no -d int) ---- */
static struct {
    uint64_t off_ip;             /* offsetof(struct pt_regs, ip) */
    int nwords;                  /* sizeof(struct pt_regs) / 8 */
} ptregs;
static uint64_t regs_pa[MAX_VCPUS];   /* per vCPU: pt_regs of the last frame, 0: none */
static uint64_t frames, frames_kernel, frames_user, frames_lost, regs_out;

/* the vCPU's current task's thread_info.sbm_state (0: not in a sandbox); a
 * filter, so an unreadable task is "not in a sandbox", not a bad read */
static int frame_sbm_state(unsigned vcpu, uint64_t *st)
{
    uint64_t task, tpa;
    const uint8_t *p;
    if (vcpu >= MAX_VCPUS || !cur_task_phys[vcpu] || !(p = phys(cur_task_phys[vcpu], 8)))
        return -1;
    memcpy(&task, p, 8);
    if (dm(task, &tpa) || !(p = phys(tpa + ctx.off_sbm_state, 8)))
        return -1;
    memcpy(st, p, 8);
    return 0;
}

/* "@sbm R rg <vcpu> <ns> <tsc> q=N rw=W0,W1..": pt_regs of the frame just written */
static void frame_flush_regs(unsigned int vcpu)
{
    char *b;
    int at;
    uint64_t pa, v;
    if (vcpu >= MAX_VCPUS || !regs_pa[vcpu])
        return;
    pa = regs_pa[vcpu];
    regs_pa[vcpu] = 0;
    b = line_buf[vcpu];
    at = put(b, 0, "@sbm R rg %u %" PRIu64 " %llu q=%" PRIu64 " rw=", vcpu, now_ns(),
             (unsigned long long)__rdtsc(), line_seq[vcpu]++);
    for (int i = 0; i < ptregs.nwords && i < MAX_WORDS; i++) {
        if (rd64(pa + 8 * (uint64_t)i, &v))
            break;
        at = put(b, at, i ? ",%" PRIx64 : "%" PRIx64, v);
    }
    __atomic_fetch_add(&regs_out, 1, __ATOMIC_RELAXED);
    emit(b, at);
}

/* the guest-physical address of a probed store (its registers flushed first); -1: none */
static int store_pa(unsigned int vcpu, qemu_plugin_meminfo_t info, uint64_t vaddr, uint64_t *pa)
{
    struct qemu_plugin_hwaddr *hw;
    frame_flush_regs(vcpu);
    hw = qemu_plugin_get_hwaddr(info, vaddr);
    if (!hw || qemu_plugin_hwaddr_is_io(hw)) {
        __atomic_fetch_add(&frames_lost, 1, __ATOMIC_RELAXED);
        return -1;
    }
    *pa = qemu_plugin_hwaddr_phys_addr(hw);
    return 0;
}

/* "@sbm T <tag> <vcpu> <ns> <tsc> q=N j=J <the task>" */
static int frame_head(char *b, char type, const struct probe *p, unsigned int vcpu)
{
    int at = put(b, 0, "@sbm %c %s %u %" PRIu64 " %llu q=%" PRIu64, type, p->tag, vcpu, now_ns(),
                 (unsigned long long)__rdtsc(), line_seq[vcpu]++);
    at = put_jiffies(b, at);
    return put_task(b, at, vcpu);
}

/* The store of the handler's first push: the frame is the words above it. */
static void on_frame(unsigned int vcpu, qemu_plugin_meminfo_t info, uint64_t vaddr, void *udata)
{
    const struct probe *p = udata;
    uint64_t pa, w[MAX_WORDS], st;
    const uint8_t *f;
    char *b;
    int at, nw = p->nwords;
    __atomic_fetch_add(&frames, 1, __ATOMIC_RELAXED);
    __atomic_fetch_add(&((struct probe *)p)->count, 1, __ATOMIC_RELAXED);
    if (vcpu >= MAX_VCPUS || nw < 6 || nw > 7 || store_pa(vcpu, info, vaddr, &pa))
        return;
    /* a frame from CPL 3 sits at a stack top: never across a page */
    if ((pa & 0xfff) + 8 * (uint64_t)nw > 0x1000) {
        __atomic_fetch_add(&frames_kernel, 1, __ATOMIC_RELAXED);
        return;
    }
    f = phys(pa, 8 * (uint64_t)nw);
    if (!f) {                            /* not in guest RAM: not a stack */
        __atomic_fetch_add(&frames_lost, 1, __ATOMIC_RELAXED);
        return;
    }
    memcpy(w, f, 8 * (size_t)nw);
    if ((w[nw - 4] & 3) != 3) {          /* CS: an interrupt of kernel code */
        __atomic_fetch_add(&frames_kernel, 1, __ATOMIC_RELAXED);
        return;
    }
    if (frame_sbm_state(vcpu, &st) || !st) {   /* user mode of a task not in a sandbox */
        __atomic_fetch_add(&frames_user, 1, __ATOMIC_RELAXED);
        return;
    }
    sbx_kernel_entered(vcpu);
    b = line_buf[vcpu];
    at = frame_head(b, 'F', p, vcpu);
    at = put(b, at, " mva=%" PRIx64 " mpa=%" PRIx64 " mw=", vaddr, pa);
    for (int i = 0; i < nw; i++)
        at = put(b, at, i ? ",%" PRIx64 : "%" PRIx64, w[i]);
    emit(b, at);
    /* pt_regs ends with the hardware frame: its ip is the frame's RIP */
    if (ptregs.nwords && pa + 8 * (uint64_t)(nw - 5) >= ptregs.off_ip)
        regs_pa[vcpu] = pa + 8 * (uint64_t)(nw - 5) - ptregs.off_ip;
}

/* .Lerror_entry_from_sbm's store into pt_regs->cs: the whole entry at once */
static void on_sbment(unsigned int vcpu, qemu_plugin_meminfo_t info, uint64_t vaddr, void *udata)
{
    const struct probe *p = udata;
    uint64_t pa, regs, v;
    char *b;
    int at;
    if (!qemu_plugin_mem_is_store(info))     /* andb is a read and a write */
        return;
    __atomic_fetch_add(&frames, 1, __ATOMIC_RELAXED);
    if (vcpu >= MAX_VCPUS || !ptregs.nwords || store_pa(vcpu, info, vaddr, &pa))
        return;
    sbx_kernel_entered(vcpu);
    regs = pa - (ptregs.off_ip + 8);          /* cs follows ip in pt_regs */
    if (pa < ptregs.off_ip + 16 || !phys(regs - 8, 8 * (uint64_t)(ptregs.nwords + 1)) ||
        ((regs - 8) >> 12) != ((regs + 8 * (uint64_t)ptregs.nwords - 1) >> 12)) {
        __atomic_fetch_add(&frames_lost, 1, __ATOMIC_RELAXED);
        return;
    }
    b = line_buf[vcpu];
    at = frame_head(b, 'E', p, vcpu);
    rd64(regs - 8, &v);
    at = put(b, at, " mpa=%" PRIx64 " ra=%" PRIx64 " rw=", pa, v);
    for (int i = 0; i < ptregs.nwords && i < MAX_WORDS; i++) {
        rd64(regs + 8 * (uint64_t)i, &v);
        at = put(b, at, i ? ",%" PRIx64 : "%" PRIx64, v);
    }
    __atomic_fetch_add(&regs_out, 1, __ATOMIC_RELAXED);
    emit(b, at);
}

static void on_regs(unsigned int vcpu, void *udata)
{
    __atomic_fetch_add(&hits, 1, __ATOMIC_RELAXED);
    frame_flush_regs(vcpu);
}

static int find(const struct table *t, uint64_t va)
{
    int lo = 0, hi = t->n - 1;
    while (lo <= hi) {
        int mid = (lo + hi) / 2;
        if (t->p[mid].vaddr == va)
            return mid;
        if (t->p[mid].vaddr < va)
            lo = mid + 1;
        else
            hi = mid - 1;
    }
    return -1;
}

static void on_idle(qemu_plugin_id_t id, unsigned int vcpu);
static void after_reset(qemu_plugin_id_t id);

static void maybe_reset(void)
{
    if (__atomic_exchange_n(&reset_wanted, 0, __ATOMIC_ACQ_REL))
        qemu_plugin_reset(plugin_id, after_reset);   /* from a vCPU thread */
}

static void on_tb(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    const struct table *t = __atomic_load_n(&active, __ATOMIC_ACQUIRE);
    size_t n = qemu_plugin_tb_n_insns(tb);
    maybe_reset();
    if (!t || !t->n)
        return;
    for (size_t i = 0; i < n; i++) {
        struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, i);
        int k = find(t, qemu_plugin_insn_vaddr(insn));
        if (k < 0) {
            sbx_watch(insn);
            continue;
        }
        if (t->p[k].kind == K_FRAME) {
            qemu_plugin_register_vcpu_mem_cb(insn, on_frame, QEMU_PLUGIN_CB_NO_REGS,
                                             QEMU_PLUGIN_MEM_W, (void *)&t->p[k]);
            continue;
        }
        if (t->p[k].kind == K_SBMENT) {
            qemu_plugin_register_vcpu_mem_cb(insn, on_sbment, QEMU_PLUGIN_CB_NO_REGS,
                                             QEMU_PLUGIN_MEM_W, (void *)&t->p[k]);
            continue;
        }
        if (t->p[k].kind == K_REGS) {
            qemu_plugin_register_vcpu_insn_exec_cb(insn, on_regs, QEMU_PLUGIN_CB_NO_REGS,
                                                   (void *)&t->p[k]);
            continue;
        }
        qemu_plugin_register_vcpu_insn_exec_cb(insn, on_insn, QEMU_PLUGIN_CB_NO_REGS,
                                               (void *)&t->p[k]);
        if (t->p[k].kind == K_MEM)
            qemu_plugin_register_vcpu_mem_cb(insn, on_mem, QEMU_PLUGIN_CB_NO_REGS,
                                             QEMU_PLUGIN_MEM_RW, (void *)&t->p[k]);
    }
}

static void on_idle(qemu_plugin_id_t id, unsigned int vcpu)
{
    maybe_reset();
}

static void register_cbs(void)
{
    qemu_plugin_register_vcpu_tb_trans_cb(plugin_id, on_tb);
    qemu_plugin_register_vcpu_idle_cb(plugin_id, on_idle);
}

/* Runs once every vCPU is out of the translated code and the cache is flushed. */
static void after_reset(qemu_plugin_id_t id)
{
    struct table *old;
    pthread_mutex_lock(&lock);
    old = active;
    __atomic_store_n(&active, pending, __ATOMIC_RELEASE);
    pending = NULL;
    for (int i = 0; i < MAX_VCPUS; i++)
        want_mem[i] = NULL;
    for (int i = 0; i < MAX_VCPUS; i++)
        regs_pa[i] = 0;
    reset_done_gen = reset_want_gen;
    sbx_reset();
    pthread_mutex_unlock(&lock);
    free(old);          /* nothing translated refers to it any more */
    register_cbs();
}

static int cmp_probe(const void *a, const void *b)
{
    const struct probe *x = a, *y = b;
    return x->vaddr < y->vaddr ? -1 : x->vaddr > y->vaddr;
}

/* ---- control socket ---- */
static void reply(int fd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void reply(int fd, const char *fmt, ...)
{
    char b[512];
    va_list ap;
    int n;
    va_start(ap, fmt);
    n = vsnprintf(b, sizeof(b) - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if (n > (int)sizeof(b) - 2)
        n = sizeof(b) - 2;
    b[n++] = '\n';
    while (write(fd, b, n) < 0 && errno == EINTR)
        ;
}

static void command(int fd, char *line)
{
    char w[8][256];
    int n = sscanf(line, "%255s %255s %255s %255s %255s %255s %255s %255s",
                   w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]);
    if (n <= 0)
        return reply(fd, "error empty command");
    if (!strcmp(w[0], "ram") && n == 4) {
        int rfd = open(w[1], O_RDONLY);
        uint64_t size = strtoull(w[2], NULL, 0), below = strtoull(w[3], NULL, 0);
        void *m;
        if (rfd < 0)
            return reply(fd, "error open %s: %s", w[1], strerror(errno));
        m = mmap(NULL, size, PROT_READ, MAP_SHARED, rfd, 0);
        close(rfd);
        if (m == MAP_FAILED)
            return reply(fd, "error mmap: %s", strerror(errno));
        if (below > size)
            below = size;
        ram_size = size;
        below_4g = below;
        __atomic_store_n(&ram, (const uint8_t *)m, __ATOMIC_RELEASE);
        return reply(fd, "ok ram %" PRIu64, size);
    }
    if (!strcmp(w[0], "ctx") && n == 8) {
        ctx.page_offset = strtoull(w[1], NULL, 0);
        ctx.off_pid = strtoull(w[2], NULL, 0);
        ctx.off_comm = strtoull(w[3], NULL, 0);
        ctx.off_sbm_state = strtoull(w[4], NULL, 0);
        ctx.state_words = (int)strtol(w[5], NULL, 0);
        ctx.off_sbm = strtoull(w[6], NULL, 0);
        ctx.off_error = strtoull(w[7], NULL, 0);
        ctx.valid = 1;
        return reply(fd, "ok ctx");
    }
    if (!strcmp(w[0], "cpu") && n == 3) {
        unsigned long c = strtoul(w[1], NULL, 0);
        if (c >= MAX_VCPUS)
            return reply(fd, "error vcpu %lu out of range", c);
        cur_task_phys[c] = strtoull(w[2], NULL, 0);
        return reply(fd, "ok cpu %lu", c);
    }
    if (!strcmp(w[0], "ptregs") && n == 3) {
        uint64_t off = strtoull(w[1], NULL, 0);
        long nw = strtol(w[2], NULL, 0);
        if (nw < 6 || nw > MAX_WORDS || off + 40 > 8 * (uint64_t)nw)
            return reply(fd, "error ptregs layout");
        ptregs.off_ip = off;
        ptregs.nwords = (int)nw;
        return reply(fd, "ok ptregs");
    }
    if (!strcmp(w[0], "jiffies") && n == 2) {
        jiffies_phys = strtoull(w[1], NULL, 0);
        return reply(fd, "ok jiffies");
    }
    if (!strcmp(w[0], "probe") && (n == 4 || n == 5)) {
        struct probe p = {0};
        p.vaddr = strtoull(w[1], NULL, 0);
        snprintf(p.tag, sizeof(p.tag), "%.31s", w[2]);
        if (!strcmp(w[3], "stamp"))
            p.kind = K_STAMP;
        else if (!strcmp(w[3], "ctx"))
            p.kind = K_CTX;
        else if (!strcmp(w[3], "mem"))
            p.kind = K_MEM;
        else if (!strcmp(w[3], "frame"))
            p.kind = K_FRAME;
        else if (!strcmp(w[3], "regs"))
            p.kind = K_REGS;
        else if (!strcmp(w[3], "sbment"))
            p.kind = K_SBMENT;
        else
            return reply(fd, "error kind %s", w[3]);
        p.nwords = n == 5 ? (int)strtol(w[4], NULL, 0) : 0;
        if (p.nwords < 0 || p.nwords > MAX_WORDS)
            return reply(fd, "error nwords");
        pthread_mutex_lock(&lock);
        if (!staged)
            staged = calloc(1, sizeof(*staged));
        if (!staged || staged->n >= MAX_PROBES) {
            pthread_mutex_unlock(&lock);
            return reply(fd, "error too many probes");
        }
        staged->p[staged->n++] = p;
        pthread_mutex_unlock(&lock);
        return reply(fd, "ok probe");
    }
    if (!strcmp(w[0], "arm") || !strcmp(w[0], "disarm")) {
        struct table *t = calloc(1, sizeof(*t));
        if (!t)
            return reply(fd, "error oom");
        pthread_mutex_lock(&lock);
        if (!strcmp(w[0], "arm") && staged) {
            memcpy(t, staged, sizeof(*t));
            qsort(t->p, t->n, sizeof(t->p[0]), cmp_probe);
        }
        free(staged);
        staged = NULL;
        free(pending);
        pending = t;
        reset_want_gen++;
        pthread_mutex_unlock(&lock);
        __atomic_store_n(&reset_wanted, 1, __ATOMIC_RELEASE);
        return reply(fd, "ok %s %d gen %d", w[0], t->n, reset_want_gen);
    }
    if (!strcmp(w[0], "frames")) {      /* the busiest frame probes: "tag=count ..." */
        char b[400];
        int at = 0;
        pthread_mutex_lock(&lock);
        for (int i = 0; active && i < active->n && at < 340; i++)
            if (active->p[i].kind == K_FRAME && active->p[i].count > 100)
                at += snprintf(b + at, sizeof(b) - at, " %s=%" PRIu64, active->p[i].tag, active->p[i].count);
        pthread_mutex_unlock(&lock);
        b[at] = 0;
        return reply(fd, "ok frames%s", b);
    }
    if (!strcmp(w[0], "status")) {
        pthread_mutex_lock(&lock);
        reply(fd, "ok status armed=%d applied=%d probes=%d hits=%" PRIu64 " snapshots=%" PRIu64
              " bad_reads=%" PRIu64 " ram=%d mem_armed=%" PRIu64 " mem_lost=%" PRIu64 " lines=%" PRIu64
              " frames=%" PRIu64 " frames_kernel=%" PRIu64 " frames_user=%" PRIu64 " frames_lost=%" PRIu64
              " regs=%" PRIu64,
              reset_want_gen, reset_done_gen, active ? active->n : 0, hits, snapshots, bad_reads,
              ram != NULL, mem_armed, mem_lost, lines_out, frames, frames_kernel, frames_user,
              frames_lost, regs_out);
        pthread_mutex_unlock(&lock);
        return;
    }
    if (!strcmp(w[0], "insns"))
        return sbx_status(fd);
    if (!strcmp(w[0], "insnskip") && n == 3) {
        sbx_skip_lo = strtoull(w[1], NULL, 0);
        sbx_skip_hi = strtoull(w[2], NULL, 0);
        return reply(fd, "ok insnskip");
    }
    reply(fd, "error unknown command: %.40s", w[0]);
}

static void sbx_status(int fd)
{
    reply(fd, "ok insns lines=%" PRIu64 " sites=%" PRIu64 " full=%" PRIu64, sbx_lines, sbx_sites, sbx_full);
}

static void *control(void *arg)
{
    int srv = (int)(intptr_t)arg;
    for (;;) {
        int fd = accept(srv, NULL, NULL);
        char buf[4096];
        size_t have = 0;
        if (fd < 0) {
            if (errno == EINTR)
                continue;
            return NULL;
        }
        for (;;) {
            ssize_t r = read(fd, buf + have, sizeof(buf) - 1 - have);
            char *nl;
            if (r < 0 && errno == EINTR)
                continue;    /* a signal of QEMU's landed on this thread */
            if (r <= 0)
                break;
            have += (size_t)r;
            buf[have] = 0;
            while ((nl = memchr(buf, '\n', have))) {
                *nl = 0;
                command(fd, buf);
                have -= (size_t)(nl + 1 - buf);
                memmove(buf, nl + 1, have);
                buf[have] = 0;
            }
            if (have >= sizeof(buf) - 1)
                have = 0;    /* an overlong line: drop it */
        }
        close(fd);
    }
}

__attribute__((visibility("default")))
int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc, char **argv)
{
    const char *sock = NULL;
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    pthread_t th;
    int srv;
    for (int i = 0; i < argc; i++)
        if (!strncmp(argv[i], "sock=", 5))
            sock = argv[i] + 5;
    if (!info->system_emulation || strcmp(info->target_name, "x86_64")) {
        fprintf(stderr, "sbmtrace: x86_64 system emulation only\n");
        return -1;
    }
    if (!sock || strlen(sock) >= sizeof(sa.sun_path)) {
        fprintf(stderr, "sbmtrace: need sock=PATH (a unix socket path)\n");
        return -1;
    }
    plugin_id = id;
    unlink(sock);
    snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", sock);
    srv = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (srv < 0 || bind(srv, (struct sockaddr *)&sa, sizeof(sa)) || listen(srv, 4)) {
        fprintf(stderr, "sbmtrace: cannot listen on %s: %s\n", sock, strerror(errno));
        return -1;
    }
    if (pthread_create(&th, NULL, control, (void *)(intptr_t)srv)) {
        fprintf(stderr, "sbmtrace: no control thread\n");
        return -1;
    }
    pthread_detach(th);
    register_cbs();
    return 0;
}
