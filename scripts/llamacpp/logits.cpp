// modelpress-logits: next-token logits of a GGUF model in llama.cpp, for comparing exports with the model they
// came from. Usage: modelpress-logits MODEL.gguf TOKENS.i32 WINDOWS LENGTH THREADS OUT.f32
// TOKENS.i32 holds WINDOWS x LENGTH int32 token ids; OUT.f32 receives WINDOWS x LENGTH x n_vocab float32 logits
// (row t predicts token t+1). Each window is decoded from an empty cache, in one batch.
#include "llama.h"

#include <cstdio>
#include <cstdlib>
#include <vector>

int main(int argc, char ** argv) {
    if (argc != 7) {
        std::fprintf(stderr, "usage: %s MODEL.gguf TOKENS.i32 WINDOWS LENGTH THREADS OUT.f32\n", argv[0]);
        return 2;
    }
    const int windows = std::atoi(argv[3]);
    const int length = std::atoi(argv[4]);
    const int threads = std::atoi(argv[5]);
    std::vector<llama_token> tokens(size_t(windows) * length);
    FILE * in = std::fopen(argv[2], "rb");
    if (!in || std::fread(tokens.data(), sizeof(llama_token), tokens.size(), in) != tokens.size()) {
        std::fprintf(stderr, "cannot read %zu tokens from %s\n", tokens.size(), argv[2]);
        return 1;
    }
    std::fclose(in);

    llama_backend_init();
    llama_model_params mparams = llama_model_default_params();
    llama_model * model = llama_model_load_from_file(argv[1], mparams);
    if (!model) {
        std::fprintf(stderr, "llama.cpp could not load %s\n", argv[1]);
        return 1;
    }
    llama_context_params cparams = llama_context_default_params();
    cparams.n_ctx = length;
    cparams.n_batch = length;
    cparams.n_ubatch = length;
    cparams.n_threads = threads;
    cparams.n_threads_batch = threads;
    llama_context * ctx = llama_init_from_model(model, cparams);
    if (!ctx) {
        std::fprintf(stderr, "llama.cpp could not create a context\n");
        return 1;
    }
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    FILE * out = std::fopen(argv[6], "wb");
    if (!out) {
        std::fprintf(stderr, "cannot write %s\n", argv[6]);
        return 1;
    }
    llama_batch batch = llama_batch_init(length, 0, 1);
    for (int w = 0; w < windows; ++w) {
        llama_memory_clear(llama_get_memory(ctx), true);
        batch.n_tokens = length;
        for (int t = 0; t < length; ++t) {
            batch.token[t] = tokens[size_t(w) * length + t];
            batch.pos[t] = t;
            batch.n_seq_id[t] = 1;
            batch.seq_id[t][0] = 0;
            batch.logits[t] = 1;
        }
        if (llama_decode(ctx, batch) != 0) {
            std::fprintf(stderr, "llama_decode failed on window %d\n", w);
            return 1;
        }
        for (int t = 0; t < length; ++t) {
            std::fwrite(llama_get_logits_ith(ctx, t), sizeof(float), n_vocab, out);
        }
    }
    std::fclose(out);
    llama_batch_free(batch);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
