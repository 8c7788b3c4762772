// Ember mobile runner: loads an Ember-compiled model (TVM Relax VM executable, aarch64 .so)
// with the TVM runtime and runs it. It doubles as the example an app developer copies:
//
//   1. load the shared library and create the Relax VM on the CPU,
//   2. load the weights (TVM's param-dict format; tensors named p0000, p0001, ... in argument
//      order),
//   3. wrap the app's input buffers as tensors (FromNDAlloc + memcpy here),
//   4. call "main"(inputs..., weights...) and read the output tensors.
//
// Usage: runner MODEL.so WEIGHTS.params INPUTS.params OUTPUTS.params [--repeat N]
//   INPUTS.params holds the inputs named i0, i1, ...; OUTPUTS.params receives o0, o1, ...
//   --repeat N runs main N more times after the first call and prints the mean latency.
//
// Build (aarch64):
//   aarch64-linux-gnu-g++ -std=c++17 -O2 runner.cc -I<tvm_ffi>/include -I<dlpack>/include
//       -L<lib> -ltvm_runtime -ltvm_ffi -Wl,-rpath,'$ORIGIN' -o runner
#include <dlpack/dlpack.h>
#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/string.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;

namespace {

// Plain malloc'ed CPU memory, 64-byte aligned (TVM kernels assume aligned buffers).
struct AlignedCPUAlloc {
  void AllocData(DLTensor* t) {
    size_t n = ffi::GetDataSize(*t);
    t->data = std::aligned_alloc(64, (n + 63) / 64 * 64 + 64);
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

constexpr DLDevice kCPU{kDLCPU, 0};

// An app-owned tensor holding a copy of `src` (what an app does with its camera frame/tokens).
ffi::Tensor CopyToAppTensor(const ffi::Tensor& src) {
  ffi::Tensor dst = ffi::Tensor::FromNDAlloc(AlignedCPUAlloc(), src.shape(), src.dtype(), kCPU);
  std::memcpy(dst.data_ptr(), src.data_ptr(), ffi::GetDataSize(src.numel(), src.dtype()));
  return dst;
}

ffi::Map<ffi::String, ffi::Tensor> LoadTensors(const std::string& path) {
  ffi::Function load = ffi::Function::GetGlobalRequired("runtime.LoadParamsFromFile");
  return load(ffi::String(path)).cast<ffi::Map<ffi::String, ffi::Tensor>>();
}

// Weights are named p0000, p0001, ...; inputs i0, i1, ...
std::string Key(char prefix, int i) {
  char buf[16];
  if (prefix == 'p') {
    std::snprintf(buf, sizeof(buf), "p%04d", i);
  } else {
    std::snprintf(buf, sizeof(buf), "%c%d", prefix, i);
  }
  return std::string(buf);
}

// Tensors named <prefix>0.. (or p0000..) in index order, stopping at the first gap.
std::vector<ffi::Tensor> Ordered(const ffi::Map<ffi::String, ffi::Tensor>& m, char prefix) {
  std::vector<ffi::Tensor> out;
  for (int i = 0;; ++i) {
    auto it = m.find(ffi::String(Key(prefix, i)));
    if (it == m.end()) break;
    out.push_back((*it).second);
  }
  if (out.size() != m.size()) {
    std::fprintf(stderr, "runner: %zu tensors but only %zu named %c0..%c%zu\n", m.size(),
                 out.size(), prefix, prefix, out.size());
    std::exit(2);
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 5) {
    std::fprintf(stderr,
                 "usage: %s MODEL.so WEIGHTS.params INPUTS.params OUTPUTS.params [--repeat N]\n",
                 argv[0]);
    return 2;
  }
  int repeat = 0;
  if (argc >= 7 && std::string(argv[5]) == "--repeat") repeat = std::atoi(argv[6]);
  try {
    // 1. the model library -> Relax VM on the CPU (device type, id, allocator kind for the
    //    device and again for the host; allocator 2 = pooled)
    ffi::Module lib = ffi::Module::LoadFromFile(argv[1]);
    ffi::Function load_exec = lib->GetFunction("vm_load_executable").value();
    ffi::Module vm = load_exec().cast<ffi::Module>();
    ffi::Function init = vm->GetFunction("vm_initialization").value();
    init(static_cast<int>(kDLCPU), 0, 2, static_cast<int>(kDLCPU), 0, 2);
    ffi::Function run = vm->GetFunction("main").value();

    // 2. weights, loaded once
    std::vector<ffi::Tensor> weights = Ordered(LoadTensors(argv[2]), 'p');

    // 3. inputs: app-owned buffers
    std::vector<ffi::Tensor> inputs;
    for (const ffi::Tensor& t : Ordered(LoadTensors(argv[3]), 'i')) {
      inputs.push_back(CopyToAppTensor(t));
    }

    std::vector<ffi::AnyView> args;
    for (const ffi::Tensor& t : inputs) args.emplace_back(t);
    for (const ffi::Tensor& t : weights) args.emplace_back(t);
    auto call = [&]() {
      ffi::Any rv;
      run.CallPacked(args.data(), static_cast<int32_t>(args.size()), &rv);
      return rv;
    };

    // 4. call main; the result is one tensor or an array of tensors
    ffi::Any result = call();
    if (repeat > 0) {
      auto t0 = std::chrono::steady_clock::now();
      for (int i = 0; i < repeat; ++i) call();
      double ms = std::chrono::duration<double, std::milli>(
                      std::chrono::steady_clock::now() - t0).count() / repeat;
      std::fprintf(stderr, "runner: main takes %.3f ms (mean of %d)\n", ms, repeat);
    }
    ffi::Map<ffi::String, ffi::Tensor> outs;
    if (auto one = result.try_cast<ffi::Tensor>()) {
      outs.Set("o0", one.value());
    } else {
      ffi::Array<ffi::Any> arr = result.cast<ffi::Array<ffi::Any>>();
      for (size_t i = 0; i < arr.size(); ++i) {
        outs.Set("o" + std::to_string(i), arr[i].cast<ffi::Tensor>());
      }
    }
    ffi::Function save = ffi::Function::GetGlobalRequired("runtime.SaveParamsToFile");
    save(outs, ffi::String(argv[4]));
  } catch (const ffi::Error& e) {
    std::fprintf(stderr, "runner: TVM error: %s\n", e.what());
    return 1;
  }
  return 0;
}
