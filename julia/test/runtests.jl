using Emu
using Test

@testset "spectral operators" begin
    kx, ky = angular_wavenumbers(8, 2π)
    @test kx == [0.0, 1.0, 2.0, 3.0, 4.0]
    @test ky == [0.0, 1.0, 2.0, 3.0, -4.0, -3.0, -2.0, -1.0]
    mask = two_thirds_mask(64)
    @test size(mask) == (33, 64)
    @test sum(mask[:, 1]) == 22          # kx = 0..21 kept
    @test mask[23, 1] == 0.0             # kx = 22 removed
    sigma = exponential_filter(64)
    @test sigma[1, 1] == 1.0
    @test all(0 .<= sigma .<= 1)
end
