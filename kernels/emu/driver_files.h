// What the attention drivers share: failing with a message, the binary tensor files the
// Rust test writes and reads back, and finding a kernel by name (link with -rdynamic).
#pragma once

#include <dlfcn.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

[[noreturn]] inline void die(const std::string& what) {
    std::fprintf(stderr, "emulation driver: %s\n", what.c_str());
    std::exit(2);
}

// Exactly `count` values of T from `path`, or die.
template <typename T>
std::vector<T> read(const std::string& path, size_t count) {
    std::vector<T> v(count);
    std::ifstream f(path, std::ios::binary);
    if (!f.read(reinterpret_cast<char*>(v.data()), count * sizeof(T)) || f.peek() != EOF)
        die(path + ": not " + std::to_string(count) + " values");
    return v;
}

template <typename T>
void write(const std::string& path, const std::vector<T>& v) {
    std::ofstream f(path, std::ios::binary);
    if (!f.write(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T))) die("writing " + path);
}

// The kernel entry point `name`, as the emulation compiled it.
template <typename Fn>
Fn* kernel(const std::string& name) {
    void* f = dlsym(RTLD_DEFAULT, name.c_str());
    if (f == nullptr) die("no kernel " + name + " (built with -rdynamic?)");
    return reinterpret_cast<Fn*>(f);
}
