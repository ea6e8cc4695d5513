/*
 * The toy guest's vCPU loop: 64-bit, position independent, no stack, no
 * memory but the control block (rdi) and the work area it names. The toy
 * VMM copies the bytes between toy_guest_start and toy_guest_end into guest
 * memory and runs them in ring 3 under KVM, or calls them on a host thread
 * (the fallback without KVM). Each write is timed with rdtsc.
 *
 * Control block (struct toy_ctl in toyvmm.h), offsets in bytes:
 *   0 seed, 8 area_base, 16 area_pages, 24 interval_tsc, 32 writes,
 *   40 command (0 run, 1 freeze, 2 return), 48 parked, 56 max_tsc,
 *   64 total_tsc, 72 next_tsc, 80 pattern (0 random, 1 sequential, 2 hot),
 *   88 hot_pages, 128 hist[64] (bucket 2k: [2^k, 1.5*2^k) cycles)
 */
    .text
    .globl toy_guest_start
    .globl toy_guest_end
toy_guest_start:
loop:
    movq 40(%rdi), %rax
    testq %rax, %rax
    jnz command
    /* xorshift64 */
    movq (%rdi), %rax
    movq %rax, %rdx
    shlq $13, %rdx
    xorq %rdx, %rax
    movq %rax, %rdx
    shrq $7, %rdx
    xorq %rdx, %rax
    movq %rax, %rdx
    shlq $17, %rdx
    xorq %rdx, %rax
    movq %rax, (%rdi)
    movq %rax, %r8
    /* target = area_base + page * 4096 + (r & 0xff8), where page is
     * (r >> 12) % area_pages (pattern 0, random), the write count % area_pages
     * (1, sequential), or for pattern 2 (hot) (r >> 12) % hot_pages when
     * r >> 56 < 230 (about 90 % of writes), else as random. toy_page_of in
     * toyvmm.h is the same rule in C. */
    shrq $12, %rax
    movq 80(%rdi), %rcx
    cmpq $1, %rcx
    jne 7f
    movq 32(%rdi), %rax
    jmp 6f
7:
    cmpq $2, %rcx
    jne 6f
    movq %r8, %rcx
    shrq $56, %rcx
    cmpq $230, %rcx
    jae 6f
    xorl %edx, %edx
    divq 88(%rdi)
    jmp 8f
6:
    xorl %edx, %edx
    divq 16(%rdi)
8:
    shlq $12, %rdx
    addq 8(%rdi), %rdx
    movq %r8, %rax
    andq $0xff8, %rax
    addq %rax, %rdx
    movq %rdx, %r9
    rdtsc
    shlq $32, %rdx
    orq %rax, %rdx
    movq %rdx, %r10
    movq %r8, (%r9)                 /* the timed write */
    rdtsc
    shlq $32, %rdx
    orq %rax, %rdx
    subq %r10, %rdx                 /* rdx = cycles */
    incq 32(%rdi)
    addq %rdx, 64(%rdi)
    cmpq 56(%rdi), %rdx
    jbe 1f
    movq %rdx, 56(%rdi)
1:
    movq %rdx, %rax
    orq $1, %rax
    bsrq %rax, %rcx                 /* rcx = msb */
    movq %rcx, %r11
    shlq $1, %r11
    testq %rcx, %rcx
    jz 2f
    decq %rcx
    btq %rcx, %rdx                  /* CF = the bit below the msb */
    adcq $0, %r11
2:
    cmpq $63, %r11
    jbe 3f
    movq $63, %r11
3:
    incq 128(%rdi,%r11,8)
    /* pacing: spin until next_tsc, then next_tsc += interval */
    movq 24(%rdi), %rcx
    testq %rcx, %rcx
    jz loop
    addq %rcx, 72(%rdi)
4:
    rdtsc
    shlq $32, %rdx
    orq %rax, %rdx
    movq 72(%rdi), %rax
    subq %rdx, %rax
    jle loop
    movq 40(%rdi), %rax              /* a command ends the wait */
    testq %rax, %rax
    jnz command
    pause
    jmp 4b
command:
    cmpq $2, %rax
    je done
    movq $1, 48(%rdi)               /* parked */
5:
    pause
    movq 40(%rdi), %rax
    cmpq $1, %rax
    je 5b
    movq $0, 48(%rdi)
    rdtsc                            /* pacing restarts after a freeze */
    shlq $32, %rdx
    orq %rax, %rdx
    movq %rdx, 72(%rdi)
    jmp loop
done:
    ret
toy_guest_end:
    .section .note.GNU-stack,"",@progbits
