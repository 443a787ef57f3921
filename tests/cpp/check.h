// The pass/fail bookkeeping shared by the C++ tests: record() counts a check (printing one line per failure),
// run_case() turns an unexpected exception into a failure, summary() prints "N passed, M failed" and gives the
// exit status (non-zero on any failure).
#pragma once

#include <c10/util/Exception.h>

#include <cstdio>
#include <exception>
#include <functional>
#include <string>

namespace torch_convt_test {

inline int g_passed = 0;
inline int g_failed = 0;

inline void record(bool ok, const std::string& name, const std::string& detail = "") {
  if (ok) {
    ++g_passed;
  } else {
    ++g_failed;
    std::printf("FAIL %s%s%s\n", name.c_str(), detail.empty() ? "" : ": ", detail.c_str());
  }
}

// Runs f, recording a failure (with the exception text) if it throws.
inline void run_case(const std::string& name, const std::function<void()>& f) {
  try {
    f();
  } catch (const c10::Error& e) {
    record(false, name, std::string("unexpected exception: ") + e.what_without_backtrace());
  } catch (const std::exception& e) {
    record(false, name, std::string("unexpected exception: ") + e.what());
  }
}

inline int summary() {
  std::printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}

}  // namespace torch_convt_test
