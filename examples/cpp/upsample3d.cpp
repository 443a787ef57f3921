// Example: a tiny 3D model - a 2x up-sampler (ConvTranspose3d, kernel 2, stride 2, as in a U-Net decoder)
// followed by a 3x3x3 Conv3d - computed by torch_convt's kernels in a plain libtorch program: forward, loss,
// backward. The same model is then run with torch's own torch::nn::functional::conv_transpose3d / conv3d, and
// the output, the input gradient and every parameter gradient are compared. Prints the max errors; exits
// non-zero on a mismatch.
#include <torch/torch.h>
#include <torch_convt/torch_convt.h>

#include <cstdio>
#include <string>
#include <vector>

namespace F = torch::nn::functional;

// The parameters live in torch's own modules (same initialisation, same state_dict as a torch::nn model);
// forward() computes with torch_convt, reference_forward() with torch::nn::functional.
struct UpsampleBlockImpl : torch::nn::Module {
  UpsampleBlockImpl(int64_t in_channels, int64_t mid_channels, int64_t out_channels)
      : up(register_module("up", torch::nn::ConvTranspose3d(
                                     torch::nn::ConvTranspose3dOptions(in_channels, mid_channels, 2).stride(2)))),
        conv(register_module("conv", torch::nn::Conv3d(
                                         torch::nn::Conv3dOptions(mid_channels, out_channels, 3).padding(1)))) {}

  torch::Tensor forward(const torch::Tensor& x) {
    torch::Tensor h = torch_convt::conv_transpose3d(x, up->weight, up->bias, /*stride=*/2);
    return torch_convt::conv3d(torch::relu(h), conv->weight, conv->bias, /*stride=*/1, /*padding=*/1);
  }

  torch::Tensor reference_forward(const torch::Tensor& x) {
    torch::Tensor h = F::conv_transpose3d(x, up->weight, F::ConvTranspose3dFuncOptions().bias(up->bias).stride(2));
    return F::conv3d(torch::relu(h), conv->weight, F::Conv3dFuncOptions().bias(conv->bias).padding(1));
  }

  torch::nn::ConvTranspose3d up;
  torch::nn::Conv3d conv;
};
TORCH_MODULE(UpsampleBlock);

struct Result {
  torch::Tensor output;
  std::vector<torch::Tensor> grads;  // input, then the parameters
};

// One forward + backward; returns the output and the gradients (and clears them for the next run).
template <typename Forward>
Result run(UpsampleBlock& model, const torch::Tensor& input, const torch::Tensor& target, Forward forward) {
  Result r;
  r.output = forward(input);
  F::mse_loss(r.output, target).backward();
  r.grads.push_back(input.grad().clone());
  input.mutable_grad().reset();
  for (auto& p : model->parameters()) {
    r.grads.push_back(p.grad().clone());
    p.mutable_grad().reset();
  }
  return r;
}

int main() {
  torch::manual_seed(0);
  UpsampleBlock model(8, 4, 2);
  const torch::Tensor input = torch::randn({2, 8, 6, 6, 6}).requires_grad_(true);
  const torch::Tensor target = torch::randn({2, 2, 12, 12, 12});

  const Result ours = run(model, input, target, [&](const torch::Tensor& x) { return model->forward(x); });
  const Result ref = run(model, input, target, [&](const torch::Tensor& x) { return model->reference_forward(x); });

  std::vector<std::string> names = {"output", "grad input"};
  for (const auto& p : model->named_parameters()) names.push_back("grad " + p.key());
  std::vector<torch::Tensor> ours_all = {ours.output}, ref_all = {ref.output};
  ours_all.insert(ours_all.end(), ours.grads.begin(), ours.grads.end());
  ref_all.insert(ref_all.end(), ref.grads.begin(), ref.grads.end());

  bool ok = true;
  std::printf("torch_convt vs torch::nn::functional (float32), output %s:\n",
              c10::str(ours.output.sizes()).c_str());
  for (size_t i = 0; i < names.size(); ++i) {
    if (ours_all[i].sizes() != ref_all[i].sizes()) {
      std::printf("  %-18s size %s != torch's %s  MISMATCH\n", names[i].c_str(),
                  c10::str(ours_all[i].sizes()).c_str(), c10::str(ref_all[i].sizes()).c_str());
      ok = false;
      continue;
    }
    const double error = (ours_all[i] - ref_all[i]).abs().max().item<double>();
    // float32: both sides round differently (sums over up to a few thousand terms), relative to the scale
    const double tolerance = 1e-4 * ref_all[i].abs().max().item<double>();
    const bool match = error <= tolerance;
    ok = ok && match;
    std::printf("  %-18s max abs error %.3g (tolerance %.3g)%s\n", names[i].c_str(), error, tolerance,
                match ? "" : "  MISMATCH");
  }
  std::printf(ok ? "OK\n" : "FAILED\n");
  return ok ? 0 : 1;
}
