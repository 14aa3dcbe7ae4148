// RocksDB's CRC-32C, chosen at run time on x86-64 (built by rocksdb-cxx,
// beside this file, in place of util/crc32c.cc's public functions).
//
// RocksDB sums a CRC-32C over every WAL record and every block it writes or
// reads. zoned_crc32c_hw::crc32c::crc32c_3way is RocksDB's own three-stream
// crc32/pclmulqdq code, built with -msse4.2 -mpclmul; the
// zoned_crc32c_portable functions are the same file built for plain x86-64
// (lookup tables). Nothing here, and nothing else in the library, uses an
// instruction beyond x86-64's baseline: the hardware path is entered only
// after cpuid said the CPU has both SSE4.2 and PCLMULQDQ.

#include <cpuid.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>

#include "util/crc32c.h"

namespace zoned_crc32c_portable::crc32c {
std::string IsFastCrc32Supported();
uint32_t Extend(uint32_t crc, const char* buf, size_t size);
uint32_t Crc32cCombine(uint32_t crc1, uint32_t crc2, size_t crc2len);
}  // namespace zoned_crc32c_portable::crc32c

namespace zoned_crc32c_hw::crc32c {
uint32_t crc32c_3way(uint32_t crc, const char* buf, size_t len);
}  // namespace zoned_crc32c_hw::crc32c

namespace ROCKSDB_NAMESPACE::crc32c {
namespace {

using Function = uint32_t (*)(uint32_t, const char*, size_t);

// cpuid leaf 1, ECX: SSE4.2 (crc32) and PCLMULQDQ. Read here rather than
// through libgcc's __builtin_cpu_supports: a checksum in another static
// initialiser may come before libgcc's constructor has read it.
bool HasHardwareCrc() {
  unsigned int eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) {
    return false;
  }
  return (ecx & bit_SSE4_2) != 0 && (ecx & bit_PCLMUL) != 0;
}

uint32_t ChooseAndExtend(uint32_t crc, const char* buf, size_t size);

// Constant-initialised (no constructor to order against other static
// initialisers): the first checksum, from any thread, chooses; threads that
// race there choose the same.
constinit std::atomic<Function> chosen{ChooseAndExtend};

uint32_t ChooseAndExtend(uint32_t crc, const char* buf, size_t size) {
  Function f = HasHardwareCrc() ? zoned_crc32c_hw::crc32c::crc32c_3way
                                : zoned_crc32c_portable::crc32c::Extend;
  chosen.store(f, std::memory_order_relaxed);
  return f(crc, buf, size);
}

}  // namespace

uint32_t Extend(uint32_t crc, const char* buf, size_t size) {
  return chosen.load(std::memory_order_relaxed)(crc, buf, size);
}

// Shifts by zeros with table arithmetic and RocksDB's portable Extend for the
// last bytes: the same value whichever Extend runs.
uint32_t Crc32cCombine(uint32_t crc1, uint32_t crc2, size_t crc2len) {
  return zoned_crc32c_portable::crc32c::Crc32cCombine(crc1, crc2, crc2len);
}

// RocksDB writes this into its LOG at every open ("Fast CRC32 supported:").
std::string IsFastCrc32Supported() {
  return HasHardwareCrc()
             ? "Supported on x86 (SSE4.2 and PCLMULQDQ, found at run time)"
             : "Not supported on x86 (no SSE4.2 or no PCLMULQDQ on this CPU: "
               "lookup tables)";
}

}  // namespace ROCKSDB_NAMESPACE::crc32c
