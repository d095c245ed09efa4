/* LD_PRELOAD shim: hide AVX-512 and AMX from the CPUID instruction in this process, so
   libraries that pick their kernels at run time (onnxruntime's MLAS, OpenBLAS, oneDNN)
   pick their AVX2 ones. bench/avx2_shim.py builds and uses it; see docs/KERNELS.md.

   How: Linux's arch_prctl(ARCH_SET_CPUID, 0) makes CPUID fault (SIGSEGV) in this thread
   and every thread or child it later forks (x86-64 CPUs with `cpuid_fault`). The handler
   runs the real CPUID with faulting briefly off, clears the AVX-512/AMX bits and steps
   over the instruction. Any other SIGSEGV goes to the handler the program installed, or
   crashes as usual. glibc chose its own string functions (ifuncs) before this runs, from
   the unmasked CPU: those stay AVX-512/EVEX variants. Execve resets the faulting; the
   inherited LD_PRELOAD turns it on again in the new program. */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <dlfcn.h>
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#define BIT(n) (1u << (n))
/* leaf 7 subleaf 0: EBX AVX512 F DQ IFMA PF ER CD BW VL; ECX VBMI VBMI2 VNNI BITALG
   VPOPCNTDQ; EDX 4VNNIW 4FMAPS VP2INTERSECT AMX-BF16 FP16 AMX-TILE AMX-INT8 */
#define L7_EBX (BIT(16) | BIT(17) | BIT(21) | BIT(26) | BIT(27) | BIT(28) | BIT(30) | BIT(31))
#define L7_ECX (BIT(1) | BIT(6) | BIT(11) | BIT(12) | BIT(14))
#define L7_EDX (BIT(2) | BIT(3) | BIT(8) | BIT(22) | BIT(23) | BIT(24) | BIT(25))
/* leaf 7 subleaf 1: EAX AVX512-BF16 AMX-FP16; EDX AMX-COMPLEX AVX10 */
#define L7S1_EAX (BIT(5) | BIT(21))
#define L7S1_EDX (BIT(8) | BIT(19))
/* leaf 0xD subleaf 0 EAX: XSAVE state components opmask, ZMM_Hi256, Hi16_ZMM, tiles */
#define LD_EAX (BIT(5) | BIT(6) | BIT(7) | BIT(17) | BIT(18))

typedef int sigaction_fn(int, const struct sigaction *, struct sigaction *);
static sigaction_fn *real_sigaction;
static struct sigaction app_segv;   /* what the program asked for SIGSEGV (default) */

static int set_faulting(int on) {
    return (int)syscall(SYS_arch_prctl, ARCH_SET_CPUID, on ? 0 : 1);
}

static void on_segv(int sig, siginfo_t *si, void *ctx) {
    greg_t *g = ((ucontext_t *)ctx)->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)g[REG_RIP];
    /* A faulting CPUID is a general-protection fault (SI_KERNEL): its RIP is mapped. */
    if (si->si_code == SI_KERNEL && ip[0] == 0x0f && ip[1] == 0xa2) {
        uint32_t leaf = (uint32_t)g[REG_RAX], sub = (uint32_t)g[REG_RCX];
        uint32_t a, b, c, d;
        int saved = errno;
        set_faulting(0);
        __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(leaf), "c"(sub));
        set_faulting(1);
        errno = saved;
        if (leaf == 7 && sub == 0) {
            b &= ~L7_EBX; c &= ~L7_ECX; d &= ~L7_EDX;
        } else if (leaf == 7 && sub == 1) {
            a &= ~L7S1_EAX; d &= ~L7S1_EDX;
        } else if (leaf == 0xd && sub == 0) {
            a &= ~LD_EAX;
        }
        g[REG_RAX] = a; g[REG_RBX] = b; g[REG_RCX] = c; g[REG_RDX] = d;
        g[REG_RIP] += 2;
        return;
    }
    if (app_segv.sa_flags & SA_SIGINFO) {
        app_segv.sa_sigaction(sig, si, ctx);
    } else if (app_segv.sa_handler != SIG_DFL && app_segv.sa_handler != SIG_IGN) {
        app_segv.sa_handler(sig);
    } else {
        /* Back to the default action: returning re-executes a fault, which now kills; a
           signal that was sent (kill, raise) is sent again. */
        struct sigaction dfl;
        memset(&dfl, 0, sizeof dfl);
        dfl.sa_handler = SIG_DFL;
        real_sigaction(SIGSEGV, &dfl, NULL);
        if (si->si_code <= 0)
            raise(sig);
    }
}

/* The program's own SIGSEGV handler (Python's faulthandler, ...) is kept aside and
   chained to, so the CPUID handler stays installed. */
int sigaction(int sig, const struct sigaction *act, struct sigaction *old) {
    if (!real_sigaction)
        real_sigaction = (sigaction_fn *)dlsym(RTLD_NEXT, "sigaction");
    if (sig != SIGSEGV)
        return real_sigaction(sig, act, old);
    struct sigaction prev = app_segv;
    if (act)
        app_segv = *act;
    if (old)
        *old = prev;
    return 0;
}

sighandler_t signal(int sig, sighandler_t handler) {
    struct sigaction act, old;
    memset(&act, 0, sizeof act);
    act.sa_handler = handler;
    act.sa_flags = SA_RESTART;
    return sigaction(sig, &act, &old) == 0 ? old.sa_handler : SIG_ERR;
}

__attribute__((constructor)) static void cpuid_mask_init(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    app_segv.sa_handler = SIG_DFL;
    if (!real_sigaction)
        real_sigaction = (sigaction_fn *)dlsym(RTLD_NEXT, "sigaction");
    if (real_sigaction(SIGSEGV, &sa, NULL) == 0)
        set_faulting(1);   /* fails harmlessly (no cpuid_fault): nothing is masked */
}
