# The KVM micro-VM's guest program: 32-bit protected mode, flat segments,
# no paging, interrupts off. Loaded at guest-physical address 0 and entered
# there on every vCPU.
#
# Each vCPU owns a status page and the data pages right after it. It
# rewrites its data pages in order, forever; a page of generation g holds
# g in its first word and g * (address | 1) in the other 1023 (generation 0
# is a zero page, what fresh memory holds). Before it rewrites a page it
# checks the page holds the generation it left there, so a page that
# migrated stale or wrong is noticed by the guest itself.
#
# Registers (set by the host at boot, carried with the vCPU state after):
#   ebx  status page address        ebp  number of data pages
#   esi  cursor: next page to write edx  pass: pages >= cursor hold this
#   esp  stack (top of the status page)   generation, pages below it pass+1
#
# Status page words: 0 pages left in this chunk, 1 mismatches seen,
# 2 address of the first bad page (0: none), 3 self-check index.
#
# Ports: in 0x10 "tick" after every 16 pages written (the host paces and
# pauses here; it answers 0 to go on, 1 to run a self-check); out 0x11 the
# pass just completed; out 0x12 "yield" every 256 pages of a self-check;
# the verdict goes out as 0x13 pages checked, 0x14 mismatches, 0x15 first
# bad page, then 0x16 the guest's verdict (0 passed, 1 failed), in this order.
#
# Rebuild the bytes in program.rs with:
#   as --32 -o p.o program.S && objcopy -O binary -j .text p.o p.bin

        .intel_syntax noprefix
        .code32
        .text
        .equ CHUNK, 16
        .equ LEFT, 0
        .equ MISMATCHES, 4
        .equ FIRST_BAD, 8
        .equ CHECK_I, 12

write_loop:
        mov dword ptr [ebx + LEFT], CHUNK
next_page:
        mov edi, esi
        shl edi, 12
        lea edi, [edi + ebx + 4096]
        mov eax, edx
        call check_page
        je 1f
        call note_bad
1:      lea eax, [edx + 1]
        call fill_page
        inc esi
        cmp esi, ebp
        jb 2f
        xor esi, esi
        inc edx
        mov eax, edx
        out 0x11, eax
2:      dec dword ptr [ebx + LEFT]
        jnz next_page
        in eax, 0x10
        test eax, eax
        jz write_loop
        call self_check
        jmp write_loop

# edi: page address, eax: generation. ZF set when the page holds it.
# Clobbers eax, ecx.
check_page:
        cmp [edi], eax
        jne 9f
        push edi
        mov ecx, edi
        or ecx, 1
        imul eax, ecx
        add edi, 4
        mov ecx, 1023
        cld
        repe scasd
        pop edi
9:      ret

# edi: page address, eax: generation to write. Clobbers eax, ecx.
fill_page:
        mov [edi], eax
        push edi
        mov ecx, edi
        or ecx, 1
        imul eax, ecx
        add edi, 4
        mov ecx, 1023
        cld
        rep stosd
        pop edi
        ret

# edi: address of a page that did not hold what it should.
note_bad:
        inc dword ptr [ebx + MISMATCHES]
        cmp dword ptr [ebx + FIRST_BAD], 0
        jne 1f
        mov [ebx + FIRST_BAD], edi
1:      ret

# Checks every data page against the generation the cursor says it holds,
# then reports. Mismatches seen while writing count too.
self_check:
        mov dword ptr [ebx + CHECK_I], 0
3:      mov edi, [ebx + CHECK_I]
        cmp edi, ebp
        jae 6f
        mov eax, edx
        cmp edi, esi
        adc eax, 0
        shl edi, 12
        lea edi, [edi + ebx + 4096]
        call check_page
        je 4f
        call note_bad
4:      inc dword ptr [ebx + CHECK_I]
        test dword ptr [ebx + CHECK_I], 255
        jnz 3b
        out 0x12, eax
        jmp 3b
6:      mov eax, [ebx + CHECK_I]
        out 0x13, eax
        mov eax, [ebx + MISMATCHES]
        out 0x14, eax
        mov eax, [ebx + FIRST_BAD]
        out 0x15, eax
        xor eax, eax
        cmp dword ptr [ebx + MISMATCHES], 0
        setne al
        out 0x16, eax
        ret
